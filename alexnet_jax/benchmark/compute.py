"""Timing the compute: the train step on random batches already on the
devices, and saving and restoring a checkpoint. Imports no TensorFlow, so it
runs on machines that have only JAX."""

import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Optional

import jax
import numpy as np

from alexnet_jax.data import device_preprocessing
from alexnet_jax.model import parallel
from alexnet_jax.train import checkpoints
from alexnet_jax.train import steps


def random_host_batch(config, count: int,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """`count` random uint8 images with labels, lighting shifts and flips, in
  host memory, as the input pipeline hands a train batch on."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  return {
      device_preprocessing.IMAGE: rng.integers(0, 256, (count, size, size, 3),
                                        dtype=np.uint8),
      device_preprocessing.LABEL: rng.integers(0, config.model.num_classes,
                                        count).astype(np.int32),
      device_preprocessing.LIGHTING: rng.normal(
          0, 3, (count, 3)).astype(np.float32),
      device_preprocessing.FLIP: rng.integers(0, 2, count).astype(bool),
  }


def random_batch(config, mesh: jax.sharding.Mesh, seed: int = 0):
  """A global batch of random_host_batch, on `mesh`."""
  return parallel.shard_batch(
      random_host_batch(config, config.batch_size // jax.process_count(),
                        seed), mesh, steps.mesh_towers(config, mesh))


class Training:
  """A train state on the mesh and its compiled step, run and timed."""

  def __init__(self, config):
    self.config = config
    self.mesh = parallel.make_mesh(config)
    self.towers = steps.mesh_towers(config, self.mesh)
    parallel.check_batch(config.batch_size, self.mesh, self.towers,
                         'batch_size')
    self.state = steps.create_sharded_train_state(config, self.mesh)
    self.step = steps.make_train_step(config, self.mesh, steps_per_epoch=1000)
    self.compile_s = None

  def run(self, batches: Iterator[Any], warmup: int, repeats: int,
          steps_per_repeat: int,
          what: str) -> tuple[list[float], list[float], list[float]]:
    """Images/sec, CPU seconds and page faults per step of each timed
    repeat."""
    started = time.perf_counter()
    self.state, _ = self.step(self.state, next(batches))
    jax.block_until_ready(self.state)
    if self.compile_s is None:
      self.compile_s = time.perf_counter() - started
    for _ in range(warmup):
      self.state, _ = self.step(self.state, next(batches))
    jax.block_until_ready(self.state)
    rates, cpu_seconds, faults = [], [], []
    for _ in range(repeats):
      started, cpu_started = time.perf_counter(), time.process_time()
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(steps_per_repeat):
        self.state, metrics = self.step(self.state, next(batches))
      jax.block_until_ready((self.state, metrics))
      rates.append(steps_per_repeat * self.config.batch_size
                   / (time.perf_counter() - started))
      cpu_seconds.append((time.process_time() - cpu_started)
                         / steps_per_repeat)
      faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                     - faults_before) / steps_per_repeat)
      print(f'{what}: {rates[-1]:.1f} images/sec, '
            f'{1000 * cpu_seconds[-1] / self.config.batch_size:.2f} CPU '
            f'ms/image', file=sys.stderr, flush=True)
    return rates, cpu_seconds, faults


def time_train_step(config, warmup: int, repeats: int, steps_per_repeat: int,
                    training: Optional[Training] = None) -> dict[str, object]:
  """Images/sec of the train step: the median over `repeats` timed runs."""
  training = training or Training(config)
  mesh = training.mesh
  rates, cpu_seconds, faults = training.run(
      itertools.repeat(random_batch(config, mesh)), warmup, repeats,
      steps_per_repeat, 'train step')
  compile_s = training.compile_s
  images_per_sec = statistics.median(rates)
  return {
      'what': 'train_step',
      'images_per_sec': round(images_per_sec, 2),
      'step_ms': round(1000 * config.batch_size / images_per_sec, 3),
      'devices': mesh.size,
      'mesh': dict(mesh.shape),
      'batch_size': config.batch_size,
      'image_size': config.image_size,
      'variant': config.model.variant,
      'width': config.model.width,
      'dtype': config.dtype,
      'device_kind': jax.devices()[0].device_kind,
      # CPU seconds (all threads) per step: on a shared machine this moves
      # less than wall time when other jobs compete for the cores.
      'cpu_s_per_step': round(statistics.median(cpu_seconds), 3),
      # Minor page faults per step: the kernel filling freshly mapped
      # memory (huge_pages.py).
      'page_faults_per_step': round(statistics.median(faults)),
      'compile_and_first_step_s': round(compile_s, 2),
      'repeats': [round(r, 2) for r in rates],
  }


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def time_checkpoint(config, repeats: int) -> dict[str, object]:
  """Seconds a save blocks the loop and takes in all, and a restore's."""
  mesh = parallel.make_mesh(config)
  state = steps.create_sharded_train_state(config, mesh)
  state, _ = steps.make_train_step(config, mesh, steps_per_epoch=1000)(
      state, random_batch(config, mesh))
  blocking, total, restore = [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    mngr = checkpoints.manager(workdir, keep=2)
    for step in range(1, repeats + 1):
      started = time.perf_counter()
      checkpoints.save(mngr, state.replace(step=step), config)
      blocking.append(time.perf_counter() - started)
      mngr.wait_until_finished()
      total.append(time.perf_counter() - started)
    size = _folder_bytes(os.path.join(checkpoints.directory(workdir),
                                      str(repeats)))
    abstract = steps.abstract_train_state(config, mesh)
    for _ in range(repeats):
      started = time.perf_counter()
      jax.block_until_ready(checkpoints.restore(mngr, abstract, repeats))
      restore.append(time.perf_counter() - started)
  return {
      'what': 'checkpoint',
      'save_blocking_s': round(statistics.median(blocking), 3),
      'save_total_s': round(statistics.median(total), 3),
      'restore_s': round(statistics.median(restore), 3),
      'megabytes': round(size / 1e6, 1),
      'variant': config.model.variant,
      'width': config.model.width,
      'devices': mesh.size,
      'device_kind': jax.devices()[0].device_kind,
  }
