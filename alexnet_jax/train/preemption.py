"""Requests to stop training early, so that it can save and exit cleanly.

SIGTERM, as batch schedulers and cloud preemption send it before killing a
job, and Ctrl-C (SIGINT), which a user expects to keep the work done: the
step finishes, a checkpoint is saved, and the run exits with one line. A
second Ctrl-C exits at once, without saving. One process handles the signal
itself; several use JAX's preemption sync point, which tells every process
to stop at the same step (jax.distributed handles SIGTERM itself there, and
Ctrl-C is passed on to it as SIGTERM).
"""

import os
import signal
import sys

import jax
import orbax.checkpoint as ocp

from alexnet_jax.runtime import workdir


class Stopped(Exception):
  """Training stopped at a request; its checkpoint is saved.

  exit_status is as if the signal had killed the process (143 for SIGTERM,
  130 for Ctrl-C), so schedulers see an unfinished job.
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


class StopRequests:
  """Within `with`, SIGTERM or Ctrl-C asks training to stop at the next step."""

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self._signalled = False
    self._interrupted = False
    self._previous_handlers = {}

  def __enter__(self) -> 'StopRequests':
    if jax.process_count() == 1:
      self._previous_handlers[signal.SIGTERM] = signal.signal(
          signal.SIGTERM, self._on_signal)
    self._previous_handlers[signal.SIGINT] = signal.signal(
        signal.SIGINT, self._on_interrupt)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def _on_interrupt(self, signum, frame) -> None:
    if self._interrupted:
      print(f'interrupted again: exiting without saving; the checkpoints in '
            f'{self._mngr.directory} are as they were', file=sys.stderr,
            flush=True)
      workdir.release_now()   # os._exit runs no `finally`
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
    self._interrupted = True
    if jax.process_index() == 0:
      print('interrupted: saving at the end of this step (Ctrl-C again to '
            'exit at once, without saving)', file=sys.stderr, flush=True)
    if jax.process_count() == 1:
      self._on_signal(signum, frame)
    else:  # the preemption sync point stops every process at one step
      os.kill(os.getpid(), signal.SIGTERM)

  @property
  def exit_status(self) -> int:
    return 128 + (signal.SIGINT if self._interrupted else signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process gets the same answer."""
    return self._signalled or self._mngr.reached_preemption(step)
