"""Joining a multi-process run (jax.distributed) before any JAX computation,
and leaving it: at the end, or when another process is lost.

A single process skips it and runs as before. Several processes find each
other from --coordinator_address, --num_processes and --process_id (the
local launcher and the Kubernetes manifest in launch/ pass them), or, left
out, from the environment JAX reads itself (SLURM, Open MPI, Cloud TPU).

A lost process. By default, when one process stops sending heartbeats the
coordination service has every other process abort (a C++ check failure
and a crash dump), and a collective that meets the dead peer first raises
a traceback. Instead, recoverability is on (jax_enable_recoverability: the
service no longer aborts the others) and a thread in every process keeps
asking the service which processes are alive (`_watch`): once one has been
silent for the heartbeat timeout, dead or frozen, every other process ends
with one error line that names it and the step the same command resumes
from, and os._exit, which skips the shutdown that can no longer succeed.
jaxlib's client also takes a missed_heartbeat_callback, but jaxlib 0.10.2
cannot pass its status to a Python callback (std::bad_cast, then abort).
One case is left to jaxlib: when process 0, which hosts the service, is
lost, the others' clients abort at once.
"""

import os
import re
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np


_SCHEDULER_PROCESS_COUNTS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def launched_by_scheduler() -> bool:
  """Whether SLURM or Open MPI started this as one of several processes."""
  return any(int(os.environ.get(name, '1')) > 1
             for name in _SCHEDULER_PROCESS_COUNTS)


def initialize(mode: str = 'auto', coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               heartbeat_timeout_s: int = 100) -> None:
  """Start jax.distributed when this is one of several processes.

  mode: 'auto' (when given a coordinator or started by SLURM / Open MPI),
  'on' (always: Cloud TPU pods and other environments JAX detects) or 'off'.
  heartbeat_timeout_s: how long a process may go silent before the others
  give up on it, so that when one dies the rest stop instead of waiting
  forever.
  """
  if mode == 'off' or (mode == 'auto' and coordinator_address is None
                       and not launched_by_scheduler()):
    return
  # CPU devices of different processes talk over gloo (tests, demos).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_enable_recoverability', True)
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
  _lost.heartbeat_timeout_s = heartbeat_timeout_s
  _lost.live = {process: 0 for process in range(jax.process_count())}
  if hasattr(_client(), 'get_live_nodes'):   # a private jaxlib call
    _lost.watching = True
    threading.Thread(target=_watch, name='alexnet_jax: process watch',
                     daemon=True).start()


class _Lost:
  """What this process knows of the others, for its last line."""

  def __init__(self):
    self.heartbeat_timeout_s = 100
    self.watching = False               # _watch runs
    self.leaving = False                # the job is ending: none is lost
    self.stopping = threading.Event()   # stop watching
    self.live: dict[int, int] = {}      # the watch's latest answer
    # What to tell the user to do, e.g. where training resumes from.
    self.resume_hint: Callable[[], str] = lambda: (
        'run the same command to start again')


_lost = _Lost()


def on_loss_say(resume_hint: Callable[[], str]) -> None:
  """What the error line tells the user when a process is lost from now on
  (the training loop: the step the same command resumes from)."""
  _lost.resume_hint = resume_hint


def _lost_processes(live) -> str:
  """'process 1' (or 'processes 1, 2'): those not among the `live` ones."""
  lost = sorted(set(range(jax.process_count())) - set(live))
  if not lost:
    return ''
  return f'process{"es" if len(lost) > 1 else ""} {", ".join(map(str, lost))}'


def _exit_lost(lost: str) -> None:
  lost = lost or 'another process'
  try:
    hint = _lost.resume_hint()
  except Exception:  # pylint: disable=broad-except
    hint = 'run the same command to resume from the latest checkpoint'
  sys.stdout.flush()
  print(f'error: {lost} of this job was lost (it stopped, or its host '
        f'did): {hint}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  # no shutdown barrier


def is_collective_failure(error: BaseException) -> bool:
  """Whether `error` is a collective that failed because a peer is gone."""
  return (jax.process_count() > 1
          and isinstance(error, jax.errors.JaxRuntimeError)
          and re.search(r'Connection (reset|closed) by peer|Gloo|'
                        r'UNAVAILABLE', str(error)) is not None)


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _watch() -> None:
  """In every process, ask the coordination service again and again which
  processes are alive, so that one that dies or hangs, anywhere, is found
  within the heartbeat timeout even where no collective fails (a frozen
  process, a host gone without closing its connections). Every live
  process must ask (get_live_nodes is a barrier): it answers once all
  have, or once the others' heartbeats have been missing for the timeout.
  This thread makes every such call of its process."""
  while not _lost.stopping.is_set():
    try:
      live = _client().get_live_nodes(list(range(jax.process_count())))
    except Exception:  # pylint: disable=broad-except
      if _lost.leaving:
        return   # the job is shutting down
      _exit_lost('the coordinator (process 0)')   # the service is gone
    _lost.live = live
    if len(live) < jax.process_count() and not _lost.leaving:
      _exit_lost(_lost_processes(live))
    _lost.stopping.wait(0.1 if _lost.leaving else 1.0)


def wait_for_the_watch(error: BaseException) -> None:
  """After a collective failed because a peer is gone: the watch names the
  lost process within the heartbeat timeout and ends this one. Where it
  finds every process alive, or where no watch runs, `error` was something
  else or cannot be told apart: raise it."""
  if _lost.watching:
    time.sleep(_lost.heartbeat_timeout_s + 10)
  raise error


# A client counts as gone once the service has its ShutdownTask, but it still
# polls the service for errors until its heartbeat thread has stopped (up to
# a second more after an in-flight heartbeat, longer on a loaded host), and a
# poll cut off by the service stopping aborts it ('Socket closed').
_AFTER_THE_OTHERS_LEFT_S = 5.0


def leave(together: bool = False) -> None:
  """Leave the job, in an order that cannot fail when processes end seconds
  apart. together: every process ends here (the run finished, or stopped
  at one step), so they first meet at a barrier. Then every process but 0
  shuts its client down, and process 0, which hosts the coordination
  service, stops it only once its watch sees the others gone (at most the
  heartbeat timeout) and they have had time to finish leaving. With
  recoverability on, JAX's own shutdown barrier no longer waits for the
  others, and a client whose service stops before it has shut down
  aborts."""
  if _client() is None:
    return   # a single process, or one that never joined
  if together:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('alexnet_jax: the end')
  _lost.leaving = True
  if jax.process_index() == 0 and _lost.watching:
    deadline = time.monotonic() + _lost.heartbeat_timeout_s
    while len(_lost.live) > 1 and time.monotonic() < deadline:
      time.sleep(0.1)
    time.sleep(_AFTER_THE_OTHERS_LEFT_S)
  _lost.stopping.set()
  jax.distributed.shutdown()


def end(status) -> None:
  """End a process that joined a job with exit status `status` (as
  sys.exit takes it), without Python's interpreter shutdown: there, a
  daemon thread of jaxlib or Orbax that wakes in C++ is unwound by force
  and aborts the process ('FATAL: exception not rethrown'). The exit
  handlers run first, as at a normal exit. A single process returns."""
  if _client() is None and not _lost.leaving:
    return
  import atexit  # pylint: disable=g-import-not-at-top
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  code = 0 if status is None else status if isinstance(status, int) else 1
  os._exit(code)  # pylint: disable=protected-access


def all_processes(value: np.ndarray) -> np.ndarray:
  """Each process's `value` (same shape everywhere), stacked in process
  order: (processes, ...). Also waits for every process to get here."""
  if jax.process_count() == 1:
    return np.asarray(value)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(value))
