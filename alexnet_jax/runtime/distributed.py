"""Joining a multi-process run (jax.distributed) before any JAX computation.

A single process skips it and runs as before. Several processes find each
other from --coordinator_address, --num_processes and --process_id (the
local launcher and the Kubernetes manifest in launch/ pass them), or, left
out, from the environment JAX reads itself (SLURM, Open MPI, Cloud TPU).
"""

import os
from typing import Optional

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
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)


def all_processes(value: np.ndarray) -> np.ndarray:
  """Each process's `value` (same shape everywhere), stacked in process
  order: (processes, ...). Also waits for every process to get here."""
  if jax.process_count() == 1:
    return np.asarray(value)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(value))
