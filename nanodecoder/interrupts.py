"""A Ctrl-C that Python drops is remembered.

Python drops an exception raised where it cannot propagate (a garbage
collection callback, e.g. JAX's, or a finalizer) and prints it as 'Exception
ignored', so a Ctrl-C landing there would be ignored. Once `install()` ran
(launch.py does), such a KeyboardInterrupt is remembered instead, without the
printout: `check()` raises it again when the command starts and when
training starts, and the training loop takes it as a Ctrl-C after every call
(`train.StopRequest`). Elsewhere (e.g. during one compiled sampling call)
pressing Ctrl-C again stops the program.
"""

import sys

_dropped = False


def install() -> None:
  previous = sys.unraisablehook
  if getattr(previous, 'remembers_interrupts', False):
    return

  def hook(unraisable):
    global _dropped
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
      _dropped = True
    else:
      previous(unraisable)

  hook.remembers_interrupts = True
  sys.unraisablehook = hook


def take() -> bool:
  """Whether Python dropped a Ctrl-C since the last `take()` or `check()`."""
  global _dropped
  dropped, _dropped = _dropped, False
  return dropped


def check() -> None:
  """Raises the KeyboardInterrupt of a Ctrl-C that Python dropped since the last check, if any."""
  if take():
    raise KeyboardInterrupt
