"""Timing the input: the input pipeline, training end to end, and
--mode=prepare, on the config's dataset or on synthetic photos, against the
decode limit (one thread decoding the same JPEGs whole)."""

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Optional

import jax
import numpy as np

from alexnet_jax.benchmark import compute
from alexnet_jax.model import parallel


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

  `src` is the training split's sources.Source when the caller has
  opened it already (listing a folder copy of ImageNet takes a while). Each
  repeat reads a pipeline of its own, warmed up first and closed after, so
  `between_repeats` (called after each) runs with no prefetching beside it
  and the next repeat starts without a head start of buffered batches.
  """
  from alexnet_jax.data import stream  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  if src is None:
    src = sources.training_source(config, config.dataset.train_split)
  images = steps_per_repeat * stream.process_batch_size(
      config.batch_size)
  rates, cpu_per_image = [], []
  for repeat in range(repeats):
    batches = stream.train_dataset(
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
    print(f'input pipeline: {rates[-1]:.1f} images/sec, '
          f'{1000 * cpu_per_image[-1]:.2f} CPU ms/image', file=sys.stderr,
          flush=True)
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


# What --photos makes, as the sources input_pipeline times in turn.
PHOTO_SOURCES = ('raw_store', 'jpeg_copy', 'full_size_jpegs')


@contextlib.contextmanager
def on_photos(config, size: str, count: int):
  """`count` synthetic photos of size WIDTHxHEIGHT, their 256-px copy and
  the raw store made from the copy, for a while.

  Yields each one's dataset name (PHOTO_SOURCES), the fields that describe
  the photos, and the copy's files, whose decode limit input_pipeline
  measures. config is left pointing at the photos.
  """
  from alexnet_jax.data import dataset_tools  # pylint: disable=g-import-not-at-top
  width, height = (int(v) for v in size.split('x'))
  with tempfile.TemporaryDirectory() as tmp:
    photos, copy, store = (os.path.join(tmp, name)
                           for name in ('photos', 'copy', 'store'))
    mean_bytes = synthetic_photos(photos, width, height, count)
    config.dataset.eval_split = config.dataset.train_split
    config.dataset.data_dir = tmp   # the screening cache
    # The photos are here to be decoded, as a large dataset's are.
    config.dataset.decoded_in_memory = False
    config.dataset.name = f'folder:{photos}'
    dataset_tools.prepare(config, copy)
    config.dataset.name, config.dataset.format = f'folder:{copy}', 'raw'
    dataset_tools.prepare(config, store)
    config.dataset.name, config.dataset.format = f'folder:{photos}', 'jpeg'
    names = dict(zip(PHOTO_SOURCES, (f'folder:{store}', f'folder:{copy}',
                                     f'folder:{photos}')))
    yield names, dict(photos=size, photo_bytes=round(mean_bytes),
                      photo_pixels=width * height), _files_under(
                          os.path.join(copy, config.dataset.train_split))


def input_pipeline_on_photos(config, size: str, count: int, rate: float,
                             warmup, repeats, steps_per_repeat):
  """time_input_pipeline on the raw store, the 256-px copy and full-size
  JPEGs of the same synthetic photos, taken in turn in every repeat, and
  the cores each needs for `rate` images/sec at its rate per core (reading
  scales with cores: every image is independent work).

  The copy's decode limit is measured after every repeat, and its rate is
  taken against the limit measured right after it: on a shared machine
  the limit alone moves by a fifth or more within minutes.
  """
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  with on_photos(config, size, count) as (names, photos, copy_jpegs):
    opened = {}
    for what, name in names.items():
      config.dataset.name = name
      opened[what] = sources.training_source(config,
                                             config.dataset.train_split)
    rates, limits = {what: [] for what in names}, []
    for _ in range(repeats):
      for what in names:
        print(f'{what}:', end=' ', file=sys.stderr, flush=True)
        config.dataset.name = names[what]
        rates[what] += time_input_pipeline(
            config, warmup, 1, steps_per_repeat, opened[what])['repeats']
      limits.append(decode_limit(copy_jpegs)[0])
  cores = len(os.sched_getaffinity(0))
  result = {'what': 'input_pipeline', **photos, 'cores': cores,
            'batch_size': config.batch_size, 'image_size': config.image_size,
            'rate': rate}
  for what, measured in rates.items():
    per_core = statistics.median(measured) / cores
    result[what] = {
        'images_per_sec': round(statistics.median(measured), 1),
        'images_per_sec_per_core': round(per_core, 1),
        'cores_for_rate': round(rate / per_core, 1),
        'repeats': [round(r, 1) for r in measured]}
  result['raw_store_over_jpeg_copy'] = round(statistics.median(
      a / b for a, b in zip(rates['raw_store'], rates['jpeg_copy'])), 2)
  result['jpeg_copy'].update(
      decode_limit_per_core=round(statistics.median(limits), 1),
      decode_limits=[round(limit, 1) for limit in limits],
      fraction_of_decode_limit=round(statistics.median(
          r / cores / limit for r, limit in zip(rates['jpeg_copy'], limits)),
                                     3))
  return result


def time_end_to_end(config, warmup: int, repeats: int,
                    steps_per_repeat: int) -> dict[str, object]:
  """Training as it runs: the real input pipeline feeding the real step.

  The input pipeline and the step are also timed alone, in the same
  process, so the result says which of the two bounds training and what
  fraction of that bound training reaches. On a host without an accelerator
  both share the cores, so training runs below either.
  """
  from alexnet_jax.data import stream  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  training = compute.Training(config)
  src = sources.training_source(config, config.dataset.train_split)
  alone = {
      'input_pipeline': time_input_pipeline(config, warmup, repeats,
                                            steps_per_repeat, src),
      'train_step': compute.time_train_step(config, warmup, repeats,
                                    steps_per_repeat, training),
  }
  rates = training.run(
      parallel.device_batches(
          stream.train_dataset(config, src).as_numpy_iterator(),
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
  each decode also pays Python's overhead (about 40% more time for 256-px
  images), and the pipeline would look faster than its limit.
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
  from alexnet_jax.data import dataset_tools  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import imagenet_archives  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
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
      sources.source(config, 'train')  # builds imagenet2012
      dataset_tools.prepare(config, os.path.join(tmp, 'through_tfds'))
      result['through_tfds_images_per_sec'] = round(
          images / (time.perf_counter() - started), 1)
  return result
