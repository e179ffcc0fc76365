"""Orbax's failures as a user should see them: classified, in one line, without the noise they leave.

A checkpoint that cannot be read is either unreadable (its files: set aside,
the previous step used) or the environment's fault (memory, permissions, the
file system: nothing moved, the run stops); `is_environment_error` tells them
apart. `first_line` is the one line a failure is reported in. What a failed
read or save leaves behind (errors Python drops, lost asyncio futures, reads
never started, the tracebacks Orbax's threads log) is hidden by `quiet_orbax_leftovers`, since the
failure itself has been reported.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import warnings

from absl import logging as absl_logging
import jax

from nanodecoder import interrupts

# Errors that say nothing about a checkpoint's files: the step is left in place and the run stops.
_ENVIRONMENT_ERRORS = (MemoryError, PermissionError, TimeoutError, ConnectionError, BlockingIOError, InterruptedError,
                       jax.errors.JaxRuntimeError)
_ENVIRONMENT_ERRNOS = {errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ESTALE, errno.EIO}
_ENVIRONMENT_STATUS = re.compile(r'\b(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED):')


def is_environment_error(error: BaseException) -> bool:
  """True if `error` (or an error it was raised from) is about memory, permissions or the file system, not the data."""
  while error is not None:
    if (isinstance(error, _ENVIRONMENT_ERRORS) or getattr(error, 'errno', None) in _ENVIRONMENT_ERRNOS
        or _ENVIRONMENT_STATUS.search(str(error))):  # tensorstore's status codes, e.g. 'RESOURCE_EXHAUSTED: ...'
      return True
    error = error.__cause__ or error.__context__
  return False


def shortened(text: str, limit: int = 240) -> str:
  """`text` cut in the middle to at most ~`limit` characters: the start says what failed, the end often why."""
  return text if len(text) <= limit else f'{text[:limit // 2]} ... {text[-limit // 2:]}'


def first_line(error: BaseException) -> str:
  """'ValueError: what failed ... why', without the storage specs TensorStore appends (kilobytes of JSON)."""
  if str(error).startswith('Encountered error while reading array index') and error.__cause__ is not None:
    error = error.__cause__  # Orbax's wrapper names only the slice; its cause says what failed
  text = re.sub(r'\s*(\[(tensorstore_spec|source locations)\b|See full TensorStore details:).*', '',
                str(error).strip(), flags=re.DOTALL)
  return f'{type(error).__name__}: {shortened((text.splitlines() or [""])[0])}'


def _from_orbax(code) -> bool:
  return f'{os.sep}orbax{os.sep}' in code.co_filename


def _leftover_of_a_failed_read(unraisable) -> bool:
  """Whether an error Python drops is what a failed restore leaves behind (its own error was handled already).

  When one array of a restore fails, Orbax closes its event loop while tensorstore still reads the others: as
  each finishes, its callback meets the closed loop ('RuntimeError: Event loop is closed' in
  call_soon_threadsafe), and Orbax's abandoned read coroutines fail when they are collected.
  """
  error, trace, obj = unraisable.exc_value, unraisable.exc_traceback, unraisable.object
  if (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed' and trace is not None
      and trace.tb_frame.f_code.co_name == 'call_soon_threadsafe'):
    return True
  return inspect.iscoroutine(obj) and _from_orbax(obj.cr_code)


class _QuietLostFutures(logging.Filter):
  """Drops asyncio's 'Future (Task, _GatheringFuture) exception was never retrieved' for a read of Orbax's that a
  failed restore left: its traceback passes through Orbax, or it is TensorStore's own error (which names its
  storage spec; only Orbax reads TensorStore here), raised in a task that wraps a TensorStore future."""

  def filter(self, record: logging.LogRecord) -> bool:
    # asyncio names the class: 'Future', 'Task', or a subclass such as asyncio.gather's '_GatheringFuture'
    lost = re.match(r'\w+ exception was never retrieved', record.getMessage()) is not None
    if not lost or not record.exc_info:
      return True
    if 'tensorstore_spec=' in str(record.exc_info[1]):
      return False
    trace = record.exc_info[2]
    while trace is not None:
      if _from_orbax(trace.tb_frame.f_code):
        return False
      trace = trace.tb_next
    return True


class _QuietOrbaxLogs(logging.Filter):
  """Drops Orbax's own log records, e.g. the tracebacks its threads log when a save fails (the failure reaches
  the user as one CheckpointError line), unless absl's verbosity asks for them (--verbosity=0)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return f'{os.sep}orbax{os.sep}' not in record.pathname or absl_logging.get_verbosity() >= absl_logging.INFO


def quiet_orbax_leftovers() -> None:
  """Hides what a failed read or save of Orbax's leaves behind (its error is reported once, by us); every other
  dropped error still prints."""
  interrupts.filter_unraisable('ignore leftovers of failed reads', _leftover_of_a_failed_read)
  # A read of one array, or of the arrays' metadata, that a failed restore abandoned before it started: Python
  # warns when it is collected.
  warnings.filterwarnings(
      'ignore', message=r"coroutine '(_read_array_index_and_device_put|Store\._get_array_metadatas)' was never awaited",
      category=RuntimeWarning)
  for name, kind in (('asyncio', _QuietLostFutures), ('absl', _QuietOrbaxLogs)):
    log = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in log.filters):
      log.addFilter(kind())
