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
from alexnet_jax.data import raw_store
from alexnet_jax.data import sources
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


def _store_rows(src: sources.Source):
  """(first row, row count, examples from a row on) of this process's
  contiguous part of src's split, as the raw store gets it."""
  if src.lookup is not None:   # any example by index: an even block each
    block = -(-src.num_examples // jax.process_count())
    first = min(src.num_examples, jax.process_index() * block)
    stop = min(src.num_examples, first + block)
    return first, stop - first, lambda row: tf.data.Dataset.range(
        row, stop).map(src.lookup, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
  # In order: this process's share of the records follows the others'.
  shares = distributed.all_processes(np.asarray(src.num_local, np.int64))
  first = int(shares[:jax.process_index()].sum())
  return first, src.num_local, lambda row: src.examples.skip(row - first)


def _prepare_store(config, out_dir: str) -> None:
  """Write the train and eval splits to out_dir as a raw store: each
  image's resize_size square as pixels (raw_store.py), every process its
  own block of rows. The same command after an interruption goes on from
  the last batch each process wrote."""
  if imagenet_archives.folder(config):
    raise errors.UserError(
        'a raw store is made from a dataset, not from the archives: prepare '
        'the 256-px copy first (--config.dataset.format=jpeg), then the '
        'store from it with --config.dataset.name=folder:COPY')
  splits = (config.dataset.train_split, config.dataset.eval_split)
  split_sources = {split: sources.source(config, split) for split in splits}
  if any(src.pixels is not None for src in split_sources.values()):
    raise errors.UserError(f'{config.dataset.name} is a raw store already: '
                           f'train from it')
  counts = {split: src.num_examples for split, src in split_sources.items()}
  side = config.resize_size
  raw_store.check_room(out_dir, counts, side)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, sources.UNFINISHED_COPY), 'a').close()
    raw_store.create(out_dir, counts, side)
  distributed.all_processes(np.zeros(1))   # the files are there
  totals, started = np.zeros(2, np.int64), time.monotonic()
  for split, src in split_sources.items():
    first, count, examples_from = _store_rows(src)
    done = raw_store.rows_written(out_dir, split, jax.process_count(),
                                  jax.process_index())
    shown = progress.Progress(config.progress_every_s, f'{split}: writing',
                              src.num_examples)
    try:
      for written in raw_store.write_rows(
          out_dir, split, first, done,
          sources.decoded(examples_from(first + done), count - done, side),
          jax.process_count(), jax.process_index()):
        shown.add(written * jax.process_count())
    except tf.errors.InvalidArgumentError as e:
      raise errors.DatasetError(
          f'an image of {split} in {config.dataset.name} cannot be decoded '
          f'({e.message.splitlines()[0]}): remove it, then run the same '
          f'command again') from e
    totals += distributed.all_processes(
        np.asarray((done, count - done), np.int64)).sum(0)
    console.report(f'{split}: {counts[split]:,} images in '
                   f'{os.path.join(out_dir, split)}')
  if jax.process_index() == 0:
    raw_store.finish(out_dir, {
        'classes': list(split_sources[splits[0]].class_names),
        'resize_size': side, 'source': config.dataset.name,
        'images': counts})
    os.remove(os.path.join(out_dir, sources.UNFINISHED_COPY))
  already, written = totals.tolist()
  seconds = time.monotonic() - started
  console.report(
      f'prepare: {written:,} images written to {out_dir} as {side}x{side} '
      f'pixels ({raw_store.size_text(raw_store.nbytes(counts, side))}; {already:,} '
      f'already there) in {seconds:.1f} s, {written / seconds:.0f} '
      f'images/sec; train from it with --config.dataset.name=folder:{out_dir}')


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
    _prepare_store(config, out_dir)
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
    split_sources = {split: sources.source(config, split)
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
