"""Speed of the compiled train step, with no input pipeline in the way.

  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=train_step --config.batch_size=64 --config.mesh.data=1

The batch is random and lives on the devices, so the figure is the network's
and the mesh's alone. Compilation and warm-up steps are excluded; the result
is the median over repeats. The last line printed is one JSON object.
Nothing here imports TensorFlow: it runs on machines with only JAX.
"""

import json
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from alexnet_jax import config as config_lib
from alexnet_jax import errors
from alexnet_jax import parallel
from alexnet_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'train_step', ['train_step'],
                          'What to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median counts.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per timed repeat.')
flags.mark_flags_as_required(['config'])


def random_batch(config, mesh: jax.sharding.Mesh, seed: int = 0):
  """A global batch of random uint8 images, labels and lighting, on `mesh`."""
  rng = np.random.default_rng(seed)
  n, size = config.batch_size // jax.process_count(), config.image_size
  return parallel.shard_batch({
      'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      'label': rng.integers(0, config.model.num_classes, n).astype(np.int32),
      'lighting': rng.normal(0, 3, (n, 3)).astype(np.float32),
  }, mesh)


def time_train_step(config, warmup: int, repeats: int,
                    steps: int) -> dict[str, object]:
  """Images/sec of the train step: the median over `repeats` timed runs."""
  mesh = parallel.make_mesh(config)
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  state = train.create_sharded_train_state(config, mesh)
  step = train.make_train_step(config, mesh, steps_per_epoch=1000)
  batch = random_batch(config, mesh)
  started = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - started
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  rates, cpu_seconds = [], []
  for _ in range(repeats):
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    rates.append(steps * config.batch_size / (time.perf_counter() - started))
    cpu_seconds.append((time.process_time() - cpu_started) / steps)
    print(f'{rates[-1]:.1f} images/sec, {cpu_seconds[-1]:.2f} CPU s/step',
          file=sys.stderr, flush=True)
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
      'compile_and_first_step_s': round(compile_s, 2),
      'repeats': [round(r, 2) for r in rates],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  try:
    config_lib.validate(config)
    result = time_train_step(config, _WARMUP.value, _REPEATS.value,
                             _STEPS.value)
  except errors.UserError as e:
    errors.exit_with_error(str(e), 1)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
