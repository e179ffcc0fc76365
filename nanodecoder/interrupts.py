"""A Ctrl-C that Python drops is remembered.

Python drops an exception raised where it cannot propagate (a garbage
collection callback, e.g. JAX's, or a finalizer) and prints it as 'Exception
ignored', so a Ctrl-C landing there would be ignored. Once `install()` ran
(launch.py does), such a KeyboardInterrupt is remembered instead, without the
printout: `check()` raises it again when the command starts and when
training starts, and the training loop takes it as a Ctrl-C after every call
(`train.StopRequest`). Python raises a KeyboardInterrupt only when the main
thread runs Python code, not during a long compiled call: `exit_on_ctrl_c()`
exits at once instead, for calls that have nothing to save (sampling).
"""

import contextlib
import os
import signal
import sys
import threading

_dropped = False


def filter_unraisable(name: str, handled) -> None:
  """Lets `handled(unraisable) -> bool` take the errors Python drops before they print; installed once per name."""
  previous = sys.unraisablehook
  hooks = previous
  while hooks is not None:
    if getattr(hooks, 'filter_name', None) == name:
      return
    hooks = getattr(hooks, 'previous', None)

  def hook(unraisable):
    if not handled(unraisable):
      previous(unraisable)

  hook.filter_name, hook.previous = name, previous
  sys.unraisablehook = hook


def _remember(unraisable) -> bool:
  global _dropped
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    _dropped = True
    return True
  return False


def install() -> None:
  filter_unraisable('remember interrupts', _remember)


def take() -> bool:
  """Whether Python dropped a Ctrl-C since the last `take()` or `check()`."""
  global _dropped
  dropped, _dropped = _dropped, False
  return dropped


def check() -> None:
  """Raises the KeyboardInterrupt of a Ctrl-C that Python dropped since the last check, if any."""
  if take():
    raise KeyboardInterrupt


@contextlib.contextmanager
def exit_on_ctrl_c():
  """Within it, Ctrl-C ends the process at once with status 130, even while a compiled call holds the main
  thread (sampling millions of tokens would otherwise run to the end). Python's own signal handler writes
  the signal's number to the wakeup file descriptor the moment it arrives; a thread waiting on it exits."""
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  previous = signal.set_wakeup_fd(write_end)

  def watch():
    while received := os.read(read_end, 1):  # empty: the pipe was closed on leaving
      if received[0] == signal.SIGINT:
        try:
          os.write(2, b'\n')  # (after the terminal's ^C)
        except OSError:  # stderr closed, or a `| tee` that the same Ctrl-C ended
          pass
        os._exit(128 + signal.SIGINT)

  watcher = threading.Thread(target=watch, name='exit on Ctrl-C', daemon=True)
  watcher.start()
  try:
    yield
  finally:
    signal.set_wakeup_fd(previous)
    os.close(write_end)
    watcher.join()
    os.close(read_end)
