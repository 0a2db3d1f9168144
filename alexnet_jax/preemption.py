"""Requests to stop training early, so that it can save and exit cleanly.

One process: SIGTERM, as batch schedulers and cloud preemption send it
before killing a job. Several processes: JAX's preemption sync point, which
tells every process to stop at the same step (jax.distributed handles the
signal itself there).
"""

import signal

import jax
import orbax.checkpoint as ocp

# The exit status of a run stopped this way: as if SIGTERM had killed it, so
# schedulers see an unfinished job, but its checkpoint is saved.
EXIT_STATUS = 128 + signal.SIGTERM


class Stopped(Exception):
  """Training stopped at a request; its checkpoint is saved."""


class StopRequests:
  """Within `with`, SIGTERM asks training to stop at the next step."""

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self._signalled = False
    self._previous_handler = None

  def __enter__(self) -> 'StopRequests':
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process gets the same answer."""
    return self._signalled or self._mngr.reached_preemption(step)
