"""Orbax's failures in one line, and only the leftovers of its failed reads hidden."""

import errno
import gc
import logging
import os
import sys
import types
import warnings

from absl import logging as absl_logging

from nanodecoder import orbax_errors


def _defined_in(path: str, source: str) -> dict:
  namespace = {}
  exec(compile(source, path, 'exec'), namespace)  # noqa: S102 (functions whose code says they come from `path`)
  return namespace


def test_only_leftovers_of_orbax_reads_are_silenced():
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'io.py')
  orbax = _defined_in(orbax_file, 'async def read():\n  pass\ndef fail():\n  raise ValueError("read failed")\n')
  # (a file named after Orbax is not Orbax's: only its package folder is)
  ours = _defined_in(os.path.join(os.sep, 'project', 'orbax_io.py'), 'async def read():\n  pass\n')
  dropped = lambda obj: types.SimpleNamespace(exc_value=RuntimeError('coroutine failed'), exc_traceback=None,
                                              object=obj)
  for coroutine, silenced in ((orbax['read'](), True), (ours['read'](), False)):
    assert orbax_errors._leftover_of_a_failed_read(dropped(coroutine)) == silenced
    coroutine.close()
  assert not orbax_errors._leftover_of_a_failed_read(dropped(None))
  try:
    orbax['fail']()
  except ValueError:
    exc_info = sys.exc_info()
  lost = lambda message, info: logging.LogRecord('asyncio', logging.ERROR, __file__, 1, message, None, info)
  quiet = orbax_errors._QuietLostFutures()
  assert not quiet.filter(lost('Future exception was never retrieved\nfuture: <Future>', exc_info))
  assert not quiet.filter(lost('_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>', exc_info))
  assert quiet.filter(lost('Future exception was never retrieved', (ValueError, ValueError('x'), None)))
  # TensorStore's error in a task wrapping its future: no Python frame of Orbax's (seen intermittently).
  tensorstore = ValueError('NOT_FOUND: Error opening "zarr" driver: ... [tensorstore_spec=\'{"driver":"zarr"}\']')
  assert not quiet.filter(lost('Task exception was never retrieved\nfuture: <Task finished coro=<_wrap_awaitable()>',
                               (ValueError, tensorstore, None)))
  assert quiet.filter(lost('Task was destroyed but it is pending!', exc_info))


def test_a_read_that_a_failed_restore_never_started_is_not_warned_about():
  """Seen once in about ten failed restores: 'RuntimeWarning: coroutine ... was never awaited' at exit (of an
  array's read, or of the arrays' metadata read: 'Store._get_array_metadatas', once in a CI run)."""
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'serialization.py')
  orbax = _defined_in(orbax_file, 'async def _read_array_index_and_device_put():\n  pass\n'
                                  'class Store:\n  async def _get_array_metadatas(self):\n    pass\n')
  ours = _defined_in(os.path.join(os.sep, 'project', 'io.py'), 'async def read():\n  pass\n'
                                                                 'class Store:\n  async def get(self):\n    pass\n')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    orbax_errors.quiet_orbax_leftovers()
    orbax['_read_array_index_and_device_put']()  # collected at once, never awaited
    orbax['Store']()._get_array_metadatas()
    ours['read']()
    ours['Store']().get()
    gc.collect()
  assert [str(w.message) for w in caught] == ["coroutine 'read' was never awaited",
                                              "coroutine 'Store.get' was never awaited"]


def test_error_lines_name_the_cause_without_tensorstore_specs():
  try:
    try:
      raise ValueError('OUT_OF_RANGE: byte range [0, 5200) is not valid for value of size 10 '
                       '[tensorstore_spec=\'{"driver": "zarr"}\'] [source locations=\'x.cc:1\']')
    except ValueError as cause:
      raise Exception('Encountered error while reading array index: (slice(0, 2),). See full TensorStore '
                      'details: <bound method spec of TensorStore({"driver": "zarr"})>.') from cause
  except Exception as e:  # noqa: BLE001
    wrapped = e
  assert orbax_errors.first_line(wrapped) == (
      'ValueError: OUT_OF_RANGE: byte range [0, 5200) is not valid for value of size 10')
  assert orbax_errors.first_line(wrapped.__cause__.with_traceback(None)) == orbax_errors.first_line(wrapped)
  unwrapped = Exception('Encountered error while reading array index: (slice(0, 2),).')  # no cause: itself
  assert orbax_errors.first_line(unwrapped) == 'Exception: Encountered error while reading array index: (slice(0, 2),).'
  assert orbax_errors.shortened('x' * 240) == 'x' * 240
  assert orbax_errors.shortened('a' * 121 + 'b' * 120) == 'a' * 120 + ' ... ' + 'b' * 120


def test_environment_errors_are_found_through_causes_errnos_and_status_codes():
  def raised(error, cause=None, context=None):
    try:
      try:
        raise context or ValueError('unrelated')
      except Exception:  # noqa: BLE001
        if cause is None:
          raise error
        raise error from cause
    except Exception as e:  # noqa: BLE001
      return e

  is_environment = orbax_errors.is_environment_error
  assert is_environment(raised(ValueError('restore failed'), cause=MemoryError('no room')))
  assert is_environment(raised(ValueError('restore failed'), context=PermissionError(errno.EACCES, 'denied')))
  assert is_environment(OSError(errno.EIO, 'Input/output error')) and is_environment(OSError(errno.ESTALE, 'stale'))
  assert is_environment(ValueError('Error reading "params" in OCDBT database: UNAVAILABLE: connection reset'))
  damaged = raised(ValueError('DATA_LOSS: checksum mismatch'), cause=FileNotFoundError(errno.ENOENT, 'no such file'))
  assert not is_environment(damaged)


def test_orbax_logs_are_dropped_unless_the_verbosity_asks_for_them():
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'async_checkpointer.py')
  record = logging.LogRecord('absl', logging.ERROR, orbax_file, 1, 'save failed', None, None)
  ours = logging.LogRecord('absl', logging.ERROR, os.path.join(os.sep, 'project', 'train.py'), 1, 'ours', None, None)
  quiet, verbosity = orbax_errors._QuietOrbaxLogs(), absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(absl_logging.WARNING)
    assert not quiet.filter(record) and quiet.filter(ours)
    absl_logging.set_verbosity(absl_logging.INFO)  # --verbosity=0
    assert quiet.filter(record)
  finally:
    absl_logging.set_verbosity(verbosity)


def test_only_a_closed_event_loop_met_in_call_soon_threadsafe_is_a_leftover():
  namespace = _defined_in(os.path.join(os.sep, 'asyncio', 'base_events.py'),
                          'def call_soon_threadsafe():\n  raise RuntimeError("Event loop is closed")\n'
                          'def call_soon():\n  raise RuntimeError("Event loop is closed")\n')
  for name, leftover in (('call_soon_threadsafe', True), ('call_soon', False)):
    try:
      namespace[name]()
    except RuntimeError as e:
      error = e
    dropped = types.SimpleNamespace(exc_value=error, exc_traceback=error.__traceback__.tb_next, object=None)
    assert orbax_errors._leftover_of_a_failed_read(dropped) == leftover, name
