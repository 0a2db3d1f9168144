"""Ctrl-C before training's own handling of it (preemption.StopRequests):
a KeyboardInterrupt, as Python's default, that cannot be lost.

Python reports an exception raised in a garbage-collection callback as
ignored and goes on, and JAX registers such a callback: a Ctrl-C that lands
while one runs (often, while a large library is imported) would be lost.
The program would then go on, or fail with another error: the built-in
dataset's workers end on the same Ctrl-C, and their pool reports itself
broken. So the Ctrl-C is also remembered, for raise_if_seen().
"""

import signal

_seen = False


def _on_ctrl_c(signum, frame) -> None:
  del signum, frame
  global _seen
  _seen = True
  raise KeyboardInterrupt


def catch() -> None:
  """Handle Ctrl-C from now on; call from the main thread."""
  signal.signal(signal.SIGINT, _on_ctrl_c)


def raise_if_seen() -> None:
  """Raise KeyboardInterrupt if Ctrl-C was pressed since catch()."""
  if _seen:
    raise KeyboardInterrupt
