"""One-time jobs over a dataset: a 256-px copy or a raw store
(--mode=prepare) and its statistics (--mode=stats).

The copy is what the paper trained from: every image with its shorter side
at resize_size, so training decodes small JPEGs. The raw store
(--config.dataset.format=raw, raw_store.py) keeps the centre square of
each as pixels, so training decodes nothing. Both are folder datasets
(read them with --config.dataset.name=folder:WORKDIR) whose manifest.json
keeps the source's class order, so labels mean the same in all three.
"""

import json
import os
import tarfile
import time

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import dataset_stats
from alexnet_jax.data import imagenet_archives
from alexnet_jax.data import sources
from alexnet_jax.data import store_writer
from alexnet_jax.data import stream
from alexnet_jax.runtime import console
from alexnet_jax.runtime import distributed
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files
from alexnet_jax.runtime import progress

JPEG_QUALITY = 95


def check_output(config, out_dir: str) -> None:
  """Refuse to write the copy into the folder dataset it copies, which
  would grow the dataset with its own copy."""
  root = sources.folder_root(config.dataset.name)
  if root is None:
    return
  source_root = os.path.realpath(root)
  out_real = os.path.realpath(out_dir)
  if out_real == source_root or out_real.startswith(source_root + os.sep):
    raise errors.UserError(
        f'--workdir={out_dir} is inside the dataset it would copy '
        f'({source_root}): give a folder outside it')


def _finished_numbers(folder: str, class_names) -> set[int]:
  """The numbers of this process's images already written under folder; its
  half-written ones (*.tmp, from a killed run) are removed."""
  numbers = set()
  for name in class_names:
    class_dir = os.path.join(folder, name)
    for file in os.listdir(class_dir):
      stem, _, extension = file.partition('.')
      if not stem.isdigit() or int(stem) % jax.process_count() != (
          jax.process_index()):
        continue
      if extension == 'jpeg':
        numbers.add(int(stem))
      elif extension == 'jpeg.tmp':
        os.remove(os.path.join(class_dir, file))
  return numbers


def _write(config, items: tf.data.Dataset, folder: str,
           shown: progress.Progress) -> list[str]:
  """Resize and encode `items` (relative path, source image, progress work)
  on every core through tf.data, and write each under folder. Returns the
  relative paths written; images that cannot be decoded are left out.

  Each image is written to a temporary name and renamed, so a file under its
  final name is complete.
  """

  @tf.autograph.experimental.do_not_convert
  def encode(relative, encoded, work):
    image = augment.shorter_side_to(encoded, config.resize_size)
    return relative, tf.io.encode_jpeg(image, quality=JPEG_QUALITY), work

  written = []
  for relative, jpeg, work in items.map(
      encode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(
          ).as_numpy_iterator():
    path = os.path.join(folder, relative.decode())
    with files.atomic_write(path, 'wb') as f:
      f.write(jpeg)
    written.append(relative.decode())
    shown.add(jax.process_count(), work)
  return written


def _prepare_split(config, src: sources.Source, split: str,
                   folder: str) -> tuple[int, int, int]:
  """Write this process's share of `split` as CLASS/NUMBER.jpeg, skipping
  the images a killed run finished. Returns how many of this process's
  share were already there, written, and skipped as undecodable.

  Numbers come from the global index, so processes never collide.
  """
  finished = _finished_numbers(folder, src.class_names)
  number = lambda index: index * jax.process_count() + jax.process_index()
  is_done = [number(i) in finished for i in range(src.num_local)]
  todo = [i for i, done in enumerate(is_done) if not done]
  done_mask = tf.constant(is_done, tf.bool)
  names = tf.constant(src.class_names)

  @tf.autograph.experimental.do_not_convert
  def item(index, example):
    encoded, label = example
    relative = tf.strings.join([
        tf.gather(names, label), '/',
        tf.strings.as_string(number(index), width=8, fill='0'), '.jpeg'])
    return relative, encoded, tf.constant(float(jax.process_count()))

  items = src.examples.enumerate().filter(
      tf.autograph.experimental.do_not_convert(
          lambda index, _: ~tf.gather(done_mask, index))).map(item)
  shown = progress.Progress(config.progress_every_s, f'{split}: writing',
                            len(todo) * jax.process_count())
  written = {int(os.path.basename(p).partition('.')[0])
             for p in _write(config, items, folder, shown)}
  for index in todo:
    if number(index) not in written:
      console.warning(f'skipped example {index} of {split}: cannot be decoded')
  return src.num_local - len(todo), len(written), len(todo) - len(written)


def _prepare_split_from_archive(config, manual: str, split: str,
                                share_bytes: int,
                                folder: str) -> tuple[int, int, int]:
  """Write this process's share of `split` straight from ImageNet's archive
  as CLASS/STEM.jpeg (n01440764_10026.jpeg, ILSVRC2012_val_00000001.jpeg),
  skipping the images a killed run finished. Returns how many of this
  process's share were already there, written, and skipped as
  undecodable."""
  finished = []

  def done(relative):
    if os.path.exists(os.path.join(folder, relative)):
      finished.append(relative)
      return True
    return False

  shown = progress.Progress(config.progress_every_s, f'{split}: writing',
                            share_bytes,
                            archive=imagenet_archives.SPLITS[split])
  items, reading = imagenet_archives.dataset(manual, split, done)
  written = _write(config, items, folder, shown)
  if isinstance(reading.error, (tarfile.TarError, EOFError, OSError)):
    raise errors.DatasetError(
        f'{os.path.join(manual, imagenet_archives.SPLITS[split])} is damaged '
        f'({reading.error}): download it again; the images written so far '
        f'stay, and the same command goes on from them') from reading.error
  if reading.error:
    raise reading.error
  skipped = sorted(set(reading.given) - set(written))
  for relative in skipped:
    console.warning(f'skipped {relative} of {split}: cannot be decoded')
  return len(finished), len(written), len(skipped)


def prepare(config, out_dir: str) -> None:
  """Write the train and eval splits to out_dir at resize_size, as a 256-px
  copy or (dataset.format=raw) a raw store.

  Until manifest.json marks it complete, a marker file makes folder
  datasets refuse it; the same command after an interruption goes on where
  it stopped.
  """
  check_output(config, out_dir)
  manifest_path = os.path.join(out_dir, 'manifest.json')
  if os.path.exists(manifest_path):
    raise errors.UserError(f'{out_dir} already holds a prepared dataset: '
                           f'train with --config.dataset.name=folder:{out_dir}')
  if config.dataset.format == 'raw':
    store_writer.prepare(config, out_dir)
    return
  splits = (config.dataset.train_split, config.dataset.eval_split)
  manual = imagenet_archives.folder(config)
  if manual:
    share_bytes = {split: imagenet_archives.share_bytes(
        imagenet_archives.check_archive(os.path.join(manual, archive)))
                   for split, archive in imagenet_archives.SPLITS.items()}
    classes = imagenet_archives.class_names()
    write = lambda split, folder: _prepare_split_from_archive(
        config, manual, split, share_bytes[split], folder)
    source = f'imagenet2012 archives in {manual}'
  else:
    # The sources are opened first, so a wrong dataset leaves nothing.
    split_sources = {split: sources.to_prepare(config, split)
                     for split in splits}
    classes = split_sources[config.dataset.train_split].class_names
    write = lambda split, folder: _prepare_split(
        config, split_sources[split], split, folder)
    source = config.dataset.name
  unfinished = os.path.join(out_dir, sources.UNFINISHED_COPY)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    open(unfinished, 'a').close()
  counts, totals, started = {}, np.zeros(3, np.int64), time.monotonic()
  for split in splits:
    folder = os.path.join(out_dir, split)
    for name in classes:
      os.makedirs(os.path.join(folder, name), exist_ok=True)
    # Every process has written its share before the manifest marks the
    # copy complete.
    already, written, skipped = distributed.all_processes(
        np.asarray(write(split, folder), np.int64)).sum(0)
    counts[split] = int(already + written)
    totals += (already, written, skipped)
    console.report(f'{split}: {counts[split]:,} images in {folder}')
  if jax.process_index() == 0:
    with files.atomic_write(manifest_path) as f:
      json.dump({'classes': list(classes),
                 'resize_size': config.resize_size,
                 'source': source, 'images': counts}, f)
    os.remove(unfinished)
  already, written, skipped = totals.tolist()
  seconds = time.monotonic() - started
  console.report(
      f'prepare: {written:,} images written to {out_dir} ({already:,} already '
      f'there, {skipped:,} skipped as undecodable) in {seconds:.1f} s, '
      f'{written / seconds:.0f} images/sec; train from it with '
      f'--config.dataset.name=folder:{out_dir}')


def _image_sums(encoded, resize_size):
  image = tf.cast(augment.paper_image(encoded, resize_size), tf.float64)
  pixels = tf.reshape(image, (-1, 3))
  return image, tf.einsum('pi,pj->ij', pixels, pixels)


def stats(config, workdir: str) -> dataset_stats.Stats:
  """The train split's mean image, mean colour and RGB PCA, saved in workdir.

  Over a random sample of dataset.stats_examples images (0: all), each the
  paper's resize_size square. Each process sums its part of the sample.
  """
  started = time.monotonic()
  src = sources.source(config, config.dataset.train_split)
  sums = tf.autograph.experimental.do_not_convert(
      lambda encoded, *_: _image_sums(encoded, config.resize_size))
  if config.dataset.stats_examples <= 0:
    ds = src.examples.map(sums, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    # This process's part of the stream's first stats_examples positions.
    local = -(-min(config.dataset.stats_examples, src.num_examples)
              // jax.process_count())
    ds = stream.positioned_examples(config, src, 0, local, sums).take(local)
  ds = ds.batch(64)
  size = config.resize_size
  image_sum, outer_sum, count = np.zeros((size, size, 3)), np.zeros((3, 3)), 0
  shown = progress.Progress(
      config.progress_every_s, 'statistics', src.num_examples if (
      config.dataset.stats_examples <= 0) else min(
          config.dataset.stats_examples, src.num_examples))
  for images, outer in ds.as_numpy_iterator():
    image_sum += images.sum(0)
    outer_sum += outer.sum(0)
    count += len(images)
    shown.add(len(images) * jax.process_count())
  # Summed over the processes (carried as float32 between them, JAX's
  # default, then added in float64).
  image_sum, outer_sum, count = (
      distributed.all_processes(np.asarray(x)).sum(0, dtype=np.float64)
      for x in (image_sum, outer_sum, count))
  result = dataset_stats.from_sums(image_sum, outer_sum, int(count))
  path = os.path.join(workdir, dataset_stats.FILE_NAME)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    dataset_stats.save(path, result)
  console.report(
      f'statistics of {int(count):,} images saved to {path} in '
      f'{time.monotonic() - started:.1f} s\n'
      f'  mean_rgb {np.round(result.mean_rgb, 2).tolist()}\n'
      f'  pca_eigvals {np.round(result.pca_eigvals, 2).tolist()}\n'
      f'  pca_eigvecs {np.round(result.pca_eigvecs, 4).tolist()}\n'
      f'use them with --config.dataset.stats_file={path}')
  return result
