"""Speed of the train step, input pipeline, whole training and checkpoints.

  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=train_step --config.batch_size=64 --config.mesh.data=1
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=input_pipeline --photos=500x375 [--prepared]
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=end_to_end --photos=400x350 --config.batch_size=64
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=prepare --photos=400x350 --photos_count=1000 [--through_tfds]
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=checkpoint --config.batch_size=64 --config.mesh.data=1

train_step: the batch is random and lives on the devices, so the figure is
the network's and the mesh's alone. input_pipeline: train batches from the
config's dataset, or from --photos synthetic photo-like JPEGs of that size
(and with --prepared, from their --mode=prepare copy), on the host only.
end_to_end: that input pipeline feeding the train step, batches put on the
devices two steps ahead, as training runs; and which of the two bounds it.
prepare: --mode=prepare straight from ImageNet-layout archives of --photos
synthetic photos (10 classes), against the decode limit: one thread of
tf.io.decode_jpeg over the same files.
checkpoint: how long a save of the train state (after one step, so the
momentum is not all zeros) holds up training, how long until it is on disk,
its size, and how long a restore takes.
Compilation and warm-up are excluded; the result is the median over repeats.
The last line printed is one JSON object. The train step imports no
TensorFlow: it runs on machines with only JAX.
"""

# Run as a program, restart with huge pages before importing anything
# large (huge_pages.py says why).
if __name__ == '__main__':
  from alexnet_jax import huge_pages
  huge_pages.restart_with_huge_pages()

import contextlib
import io
import itertools
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import config as config_lib
from alexnet_jax import errors
from alexnet_jax import normalization
from alexnet_jax import parallel
from alexnet_jax import tf_runtime
from alexnet_jax import steps

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'train_step',
                          ['train_step', 'input_pipeline', 'end_to_end',
                           'checkpoint', 'prepare'],
                          'What to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.',
                               lower_bound=0)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median counts.',
                                lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps (batches) per timed repeat.',
                              lower_bound=1)
_PHOTOS = flags.DEFINE_string(
    'photos', '', 'input_pipeline, end_to_end: WIDTHxHEIGHT of synthetic '
    'photo-like JPEGs to read instead of the config\'s dataset.')
flags.register_validator(
    'photos', lambda value: not value or re.fullmatch(r'[1-9]\d*x[1-9]\d*',
                                                      value),
    message='--photos takes WIDTHxHEIGHT in pixels, e.g. 500x375')
_PHOTOS_COUNT = flags.DEFINE_integer('photos_count', 500,
                                     'How many synthetic photos.',
                                     lower_bound=1)
_PREPARED = flags.DEFINE_bool(
    'prepared', False, 'input_pipeline, end_to_end: read the photos\' 256-px '
    'copy.')
_THROUGH_TFDS = flags.DEFINE_bool(
    'through_tfds', False, 'prepare: also time the same copy made through '
    'TFDS (building imagenet2012, then prepare from it).')
flags.mark_flags_as_required(['config'])


def random_host_batch(config, count: int,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """`count` random uint8 images with labels, lighting shifts and flips, in
  host memory, as the input pipeline hands a train batch on."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  return {
      normalization.IMAGE: rng.integers(0, 256, (count, size, size, 3),
                                        dtype=np.uint8),
      normalization.LABEL: rng.integers(0, config.model.num_classes,
                                        count).astype(np.int32),
      normalization.LIGHTING: rng.normal(0, 3, (count, 3)).astype(np.float32),
      normalization.FLIP: rng.integers(0, 2, count).astype(bool),
  }


def random_batch(config, mesh: jax.sharding.Mesh, seed: int = 0):
  """A global batch of random_host_batch, on `mesh`."""
  return parallel.shard_batch(
      random_host_batch(config, config.batch_size // jax.process_count(),
                        seed), mesh, steps.mesh_towers(config, mesh))


class _Training:
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
      print(f'{what}: {rates[-1]:.1f} images/sec, {cpu_seconds[-1]:.2f} CPU '
            f's/step', file=sys.stderr, flush=True)
    return rates, cpu_seconds, faults


def time_train_step(config, warmup: int, repeats: int, steps_per_repeat: int,
                    training: Optional[_Training] = None) -> dict[str, object]:
  """Images/sec of the train step: the median over `repeats` timed runs."""
  training = training or _Training(config)
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


def _one_over_f_image(rng: np.random.Generator, width: int,
                      height: int) -> np.ndarray:
  """uint8 RGB whose spectrum falls as 1/f^0.9, as natural images' roughly
  do, with correlated channels: at 400x350 and JPEG quality 90 about 104 KB,
  near ImageNet's 110 KB, so it decodes like a photo."""
  fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
  frequency = np.hypot(fx, fy)
  frequency[0, 0] = 1.0
  channels = []
  for _ in range(3):
    spectrum = (rng.normal(size=frequency.shape)
                + 1j * rng.normal(size=frequency.shape)) / frequency**0.9
    spectrum[0, 0] = 0.0
    channels.append(np.fft.irfft2(spectrum, s=(height, width)))
  image = np.stack(channels, -1) @ (np.eye(3) + 0.3 * rng.normal(0, 1, (3, 3)))
  image = (image - image.mean()) / image.std() * 60 + 110
  return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_photos(directory: str, width: int, height: int, count: int,
                     seed: int = 0) -> float:
  """Folder dataset of 10 classes of photo-like JPEGs (quality 90) whose
  decoding costs about what a photo's does. Returns the mean file size in
  bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  sizes = []
  for i in range(count):
    buffer = io.BytesIO()
    Image.fromarray(_one_over_f_image(rng, width, height)).save(
        buffer, format='JPEG', quality=90)
    folder = os.path.join(directory, 'train', f'class{i % 10}')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{i:05d}.jpeg'), 'wb') as f:
      f.write(buffer.getvalue())
    sizes.append(len(buffer.getvalue()))
  return float(np.mean(sizes))


def _files_under(directory: str) -> list[bytes]:
  found = []
  for root, _, names in sorted(os.walk(directory)):
    for name in sorted(names):
      with open(os.path.join(root, name), 'rb') as f:
        found.append(f.read())
  return found


def time_input_pipeline(config, warmup: int, repeats: int,
                        steps_per_repeat: int, src=None,
                        between_repeats: Optional[Callable[[], None]] = None,
                        ) -> dict[str, object]:
  """Train batches/sec on the host (all its cores), median over repeats.

  `src` is the training split's input_pipeline.Source when the caller has
  opened it already (listing a folder copy of ImageNet takes a while). Each
  repeat reads a pipeline of its own, warmed up first and closed after, so
  `between_repeats` (called after each) runs with no prefetching beside it
  and the next repeat starts without a head start of buffered batches.
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if src is None:
    src = input_pipeline.training_source(config, config.dataset.train_split)
  images = steps_per_repeat * input_pipeline.process_batch_size(
      config.batch_size)
  rates, cpu_per_image = [], []
  for repeat in range(repeats):
    batches = input_pipeline.train_dataset(
        config, src, start_step=repeat * (warmup + steps_per_repeat),
    ).as_numpy_iterator()
    for _ in range(warmup):
      next(batches)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps_per_repeat):
      next(batches)
    rates.append(images / (time.perf_counter() - started))
    cpu_per_image.append((time.process_time() - cpu_started) / images)
    del batches  # stops its threads
    print(f'{rates[-1]:.1f} images/sec, {1000 * cpu_per_image[-1]:.2f} CPU '
          f'ms/image', file=sys.stderr, flush=True)
    if between_repeats is not None:
      between_repeats()
  cores = len(os.sched_getaffinity(0))
  images_per_sec = statistics.median(rates)
  return {
      'what': 'input_pipeline',
      'images_per_sec': round(images_per_sec, 1),
      'cores': cores,
      'images_per_sec_per_core': round(images_per_sec / cores, 1),
      # Per CPU second of this process: less moved by other jobs' load.
      'images_per_cpu_second': round(
          1 / statistics.median(cpu_per_image), 1),
      'dataset': config.dataset.name,
      'devices': 0,
      'batch_size': config.batch_size,
      'image_size': config.image_size,
      'repeats': [round(r, 1) for r in rates],
  }


@contextlib.contextmanager
def _on_photos(config):
  """Points config at synthetic photos (or their prepared copy) for a while.

  Yields the fields that describe them, with one measure of the decode
  limit per core, and the files read, to measure it again.
  """
  width, height = (int(v) for v in _PHOTOS.value.split('x'))
  with tempfile.TemporaryDirectory() as tmp:
    photos = os.path.join(tmp, 'photos')
    mean_bytes = synthetic_photos(photos, width, height, _PHOTOS_COUNT.value)
    config.dataset.name = f'folder:{photos}'
    config.dataset.eval_split = config.dataset.train_split
    config.dataset.data_dir = tmp   # the screening cache
    # The photos are here to be decoded, as a large dataset's are.
    config.dataset.decoded_in_memory = False
    read = photos
    if _PREPARED.value:
      from alexnet_jax import dataset_tools  # pylint: disable=g-import-not-at-top
      read = os.path.join(tmp, 'copy')
      dataset_tools.prepare(config, read)
      config.dataset.name = f'folder:{read}'
    jpegs = _files_under(os.path.join(read, 'train'))
    limit, pixels = decode_limit(jpegs)
    yield dict(photos=_PHOTOS.value, prepared=_PREPARED.value,
               photo_bytes=round(mean_bytes),
               read_bytes=round(float(np.mean([len(j) for j in jpegs]))),
               read_pixels=round(pixels),
               decode_limit_per_core=round(limit, 1)), jpegs


def _input_pipeline_on_photos(config, warmup, repeats, steps_per_repeat):
  """time_input_pipeline on synthetic photos, or on their prepared copy.

  The decode limit is measured again after every repeat, and each repeat's
  rate is taken against the limit measured right after it: on a shared
  machine the limit alone moves by a fifth or more within minutes.
  """
  with _on_photos(config) as (photos, jpegs):
    limits = []
    result = time_input_pipeline(
        config, warmup, repeats, steps_per_repeat,
        between_repeats=lambda: limits.append(decode_limit(jpegs)[0]))
  fractions = [rate / result['cores'] / limit
               for rate, limit in zip(result['repeats'], limits)]
  # The paired measures replace _on_photos' single decode_limit_per_core.
  return {**result, **photos,
          'decode_limit_per_core': round(statistics.median(limits), 1),
          'decode_limits': [round(limit, 1) for limit in limits],
          'fraction_of_decode_limit': round(statistics.median(fractions), 3)}


def time_end_to_end(config, warmup: int, repeats: int,
                    steps_per_repeat: int) -> dict[str, object]:
  """Training as it runs: the real input pipeline feeding the real step.

  The input pipeline and the step are also timed alone, in the same
  process, so the result says which of the two bounds training and what
  fraction of that bound training reaches. On a host without an accelerator
  both share the cores, so training runs below either.
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  training = _Training(config)
  src = input_pipeline.training_source(config, config.dataset.train_split)
  alone = {
      'input_pipeline': time_input_pipeline(config, warmup, repeats,
                                            steps_per_repeat, src),
      'train_step': time_train_step(config, warmup, repeats,
                                    steps_per_repeat, training),
  }
  rates = training.run(
      parallel.device_batches(
          input_pipeline.train_dataset(config, src).as_numpy_iterator(),
          training.mesh, training.towers),
      warmup, repeats, steps_per_repeat, 'end to end')[0]
  images_per_sec = statistics.median(rates)
  bound = min(alone, key=lambda what: alone[what]['images_per_sec'])
  return {
      'what': 'end_to_end',
      'images_per_sec': round(images_per_sec, 2),
      'input_pipeline_images_per_sec': alone['input_pipeline'][
          'images_per_sec'],
      'train_step_images_per_sec': alone['train_step']['images_per_sec'],
      'bound': bound,
      'fraction_of_bound': round(
          images_per_sec / alone[bound]['images_per_sec'], 3),
      'devices': training.mesh.size,
      'device_kind': jax.devices()[0].device_kind,
      'dataset': config.dataset.name,
      'batch_size': config.batch_size,
      'image_size': config.image_size,
      'dtype': config.dtype,
      'repeats': [round(r, 2) for r in rates],
  }


def decode_limit(jpegs: list[bytes]) -> tuple[float, float]:
  """Images/sec of one thread decoding whole JPEGs (tf.io.decode_jpeg,
  INTEGER_FAST, no fancy upscaling, as PERF_NOTES.md measures the limit),
  and their mean pixel count.

  The decodes run in tf.data on a pool of one thread, as the pipeline's do,
  so the figure is the decoder's alone: called once an image from Python,
  the same decodes of 256-px images took 1,535 us an image against about
  1,100, and the pipeline looked faster than its limit.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  decodes = tf.data.Dataset.from_tensor_slices(jpegs).map(
      tf.autograph.experimental.do_not_convert(
          lambda data: tf.shape(tf.io.decode_jpeg(
              data, channels=3, dct_method='INTEGER_FAST',
              fancy_upscaling=False))[:2])).batch(len(jpegs))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  started = time.perf_counter()
  shapes = next(iter(decodes.with_options(options))).numpy()
  rate = len(jpegs) / (time.perf_counter() - started)
  return rate, float(np.mean(shapes[:, 0] * shapes[:, 1]))


def time_prepare(config, photos: str, count: int,
                 through_tfds: bool) -> dict[str, object]:
  """--mode=prepare from archives of `count` synthetic photos (and as many
  tenths again as validation images), per core against the decode limit."""
  from alexnet_jax import dataset_tools  # pylint: disable=g-import-not-at-top
  from alexnet_jax import imagenet_archives  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  width, height = (int(v) for v in photos.split('x'))
  with tempfile.TemporaryDirectory() as tmp:
    mean_bytes = synthetic_photos(os.path.join(tmp, 'photos'), width, height,
                                  count)
    jpegs = _files_under(os.path.join(tmp, 'photos'))
    wnids = imagenet_archives.class_names()[:10]
    train = {wnid: [(f'{wnid}_{i}.JPEG', data)
                    for i, data in enumerate(jpegs[k::10])]
             for k, wnid in enumerate(wnids)}
    validation = [(f'ILSVRC2012_val_{i + 1:08d}.JPEG', data)
                  for i, data in enumerate(jpegs[:count // 10])]
    manual = imagenet_archives.write_archives(os.path.join(tmp, 'manual'),
                                              train, validation)
    images = len(jpegs) + len(validation)
    limit, _ = decode_limit(jpegs)
    started = time.perf_counter()
    for split in imagenet_archives.SPLITS:
      for _ in imagenet_archives.images(manual, split):
        pass
    reading = images / (time.perf_counter() - started)
    config.dataset.name = 'imagenet2012'
    config.dataset.manual_dir = manual
    config.dataset.data_dir = os.path.join(tmp, 'tfds')
    started = time.perf_counter()
    dataset_tools.prepare(config, os.path.join(tmp, 'direct'))
    rate = images / (time.perf_counter() - started)
    cores = len(os.sched_getaffinity(0))
    result = {
        'what': 'prepare', 'photos': photos,
        'photo_bytes': round(mean_bytes),
        'photo_pixels': width * height, 'images': images, 'cores': cores,
        'resize_size': config.resize_size,
        'decode_limit_per_core': round(limit, 1),
        'archive_reading_images_per_sec': round(reading, 1),
        'images_per_sec': round(rate, 1),
        'images_per_sec_per_core': round(rate / cores, 1),
        'fraction_of_decode_limit': round(rate / cores / limit, 3),
    }
    if through_tfds:
      started = time.perf_counter()
      input_pipeline.source(config, 'train')  # builds imagenet2012
      dataset_tools.prepare(config, os.path.join(tmp, 'through_tfds'))
      result['through_tfds_images_per_sec'] = round(
          images / (time.perf_counter() - started), 1)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  try:
    timings = (_WARMUP.value, _REPEATS.value, _STEPS.value)
    if _WHAT.value == 'train_step':
      result = time_train_step(config, *timings)
    elif _WHAT.value == 'checkpoint':
      result = time_checkpoint(config, _REPEATS.value)
    elif _WHAT.value == 'prepare':
      tf_runtime.start()
      result = time_prepare(config, _PHOTOS.value or '400x350',
                            _PHOTOS_COUNT.value, _THROUGH_TFDS.value)
    elif _WHAT.value == 'end_to_end':
      tf_runtime.start()
      if _PHOTOS.value:
        with _on_photos(config) as (photos, _):
          result = dict(time_end_to_end(config, *timings), **photos)
      else:
        result = time_end_to_end(config, *timings)
    elif _PHOTOS.value:
      tf_runtime.start()
      result = _input_pipeline_on_photos(config, *timings)
    else:
      tf_runtime.start()
      result = time_input_pipeline(config, *timings)
  except errors.UserError as e:
    errors.exit_with_error(str(e), 1)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
