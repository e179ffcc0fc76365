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
