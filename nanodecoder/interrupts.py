"""Ctrl-C that Python drops is not lost.

Python drops an exception raised where it cannot propagate (a garbage
collection callback, e.g. JAX's, or a finalizer) and prints it as 'Exception
ignored', so a Ctrl-C landing there would be ignored. Once `install()` ran,
such a KeyboardInterrupt is remembered instead (without the printout), and
`check()` raises it again where a long phase starts (the command, the
training loop).
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


def check() -> None:
  """Raises the KeyboardInterrupt of a Ctrl-C that Python dropped since the last check, if any."""
  global _dropped
  if _dropped:
    _dropped = False
    raise KeyboardInterrupt
