"""Ctrl-C outside the training loop: a KeyboardInterrupt that is never lost.

Python drops an exception raised where it cannot propagate (a garbage
collection callback, e.g. JAX's, or a finalizer) and prints it as 'Exception
ignored', so a Ctrl-C landing there would be ignored. `install()` remembers
it (without the printout), and `check()` raises it again where a long phase
starts (the command, the training loop).
"""

import signal
import sys

_pending = False


def _interrupt(signum=None, frame=None):
  global _pending
  _pending = True
  raise KeyboardInterrupt


interrupt = _interrupt  # raises KeyboardInterrupt from a signal handler of one's own, remembered likewise


def install() -> None:
  signal.signal(signal.SIGINT, _interrupt)
  previous = sys.unraisablehook
  if getattr(previous, 'remembers_interrupts', False):
    return

  def hook(unraisable):
    if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
      previous(unraisable)

  hook.remembers_interrupts = True
  sys.unraisablehook = hook


def check() -> None:
  """Raises KeyboardInterrupt if a Ctrl-C since `install()` was dropped before it could stop the program."""
  if _pending:
    raise KeyboardInterrupt
