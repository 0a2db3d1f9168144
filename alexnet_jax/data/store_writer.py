"""--mode=prepare --config.dataset.format=raw: a raw store (raw_store.py)
from any dataset the program reads, or straight from ImageNet's tars.

A store's files are made at their full size before anything is written, so
each process writes its own contiguous block of rows: where the source has
random access, an even block; where it is read in order (TFDS records,
tars), this process's share, after the other processes' shares. A tar's
images are counted from its headers first (imagenet_archives.share_count).
"""

import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax.data import imagenet_archives
from alexnet_jax.data import raw_store
from alexnet_jax.data import sources
from alexnet_jax.runtime import console
from alexnet_jax.runtime import distributed
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import progress


@dataclasses.dataclass(frozen=True)
class _Rows:
  """A split as the store gets it from this process."""
  total: int    # images in the split, over all processes
  first: int    # this process's first row
  count: int    # this process's rows
  # (encoded image, label) from a row of this process's block on.
  examples_from: Callable[[int], tf.data.Dataset]
  # Why the examples ended early, where the source can tell ('' if not).
  stopped_by: Callable[[], str] = lambda: ''


def _after_the_others(local: int) -> tuple[int, int]:
  """(this process's first row, the rows of all processes) where each
  process's block of `local` rows follows those of the processes before
  it."""
  shares = distributed.all_processes(np.asarray(local, np.int64))
  return int(shares[:jax.process_index()].sum()), int(shares.sum())


def _source_rows(src: sources.Source) -> _Rows:
  if src.lookup is not None:   # any example by index: an even block each
    block = -(-src.num_examples // jax.process_count())
    first = min(src.num_examples, jax.process_index() * block)
    stop = min(src.num_examples, first + block)
    return _Rows(src.num_examples, first, stop - first,
                 lambda row: tf.data.Dataset.range(row, stop).map(
                     src.lookup, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True))
  first, _ = _after_the_others(src.num_local)
  return _Rows(src.num_examples, first, src.num_local,
               lambda row: src.examples.skip(row - first))


def _archive_rows(manual: str, split: str, classes) -> _Rows:
  path = os.path.join(manual, imagenet_archives.SPLITS[split])
  local = imagenet_archives.share_count(
      path, split, imagenet_archives.check_archive(path))
  first, total = _after_the_others(local)
  labels = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(classes), tf.range(len(classes), dtype=tf.int64)), -1)
  readings = []

  def examples_from(row):
    skipped = []

    def done(_):   # the rows written before: read again, not given
      skipped.append(None)
      return len(skipped) <= row - first

    items, reading = imagenet_archives.dataset(manual, split, done)
    readings.append(reading)
    return items.map(tf.autograph.experimental.do_not_convert(
        lambda relative, data, _: (data, labels.lookup(
            tf.strings.split(relative, '/')[0]))))

  def stopped_by():
    error = readings[-1].error if readings else None
    return (f'{path} is damaged ({error}): download it again' if error
            else '')

  return _Rows(total, first, local, examples_from, stopped_by)


def prepare(config, out_dir: str) -> None:
  """Write the train and eval splits to out_dir as a raw store: each
  image's resize_size square as pixels. The same command after an
  interruption goes on from the last batch each process wrote."""
  manual = imagenet_archives.folder(config)
  if manual:
    classes = imagenet_archives.class_names()
    rows = {split: _archive_rows(manual, split, classes)
            for split in imagenet_archives.SPLITS}
    source = f'imagenet2012 archives in {manual}'
  else:
    splits = (config.dataset.train_split, config.dataset.eval_split)
    split_sources = {split: sources.to_prepare(config, split)
                     for split in splits}
    classes = split_sources[splits[0]].class_names
    rows = {split: _source_rows(src) for split, src in split_sources.items()}
    source = config.dataset.name
  counts = {split: split_rows.total for split, split_rows in rows.items()}
  side = config.resize_size
  raw_store.check_room(out_dir, counts, side)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, sources.UNFINISHED_COPY), 'a').close()
    raw_store.create(out_dir, counts, side)
  distributed.all_processes(np.zeros(1))   # the files are there
  totals, started = np.zeros(2, np.int64), time.monotonic()
  for split, split_rows in rows.items():
    totals += _write_split(config, out_dir, split, split_rows, source)
    console.report(f'{split}: {counts[split]:,} images in '
                   f'{os.path.join(out_dir, split)}')
  if jax.process_index() == 0:
    raw_store.finish(out_dir, {'classes': list(classes), 'resize_size': side,
                               'source': source, 'images': counts})
    os.remove(os.path.join(out_dir, sources.UNFINISHED_COPY))
  already, written = totals.tolist()
  seconds = time.monotonic() - started
  console.report(
      f'prepare: {written:,} images written to {out_dir} as {side}x{side} '
      f'pixels ({raw_store.size_text(raw_store.nbytes(counts, side))}; '
      f'{already:,} already there) in {seconds:.1f} s, '
      f'{written / seconds:.0f} images/sec; train from it with '
      f'--config.dataset.name=folder:{out_dir}')


def _write_split(config, out_dir: str, split: str, rows: _Rows,
                 source: str) -> np.ndarray:
  """This process's rows of `split`; (rows there before, rows written) over
  all processes."""
  processes, process = jax.process_count(), jax.process_index()
  done = raw_store.rows_written(out_dir, split, processes, process)
  shown = progress.Progress(config.progress_every_s, f'{split}: writing',
                            rows.total)
  decoded = sources.decoded(rows.examples_from(rows.first + done),
                            rows.count - done, config.resize_size)
  written = 0
  try:
    for batch in raw_store.write_rows(out_dir, split, rows.first, done,
                                      decoded, processes, process):
      written += batch
      shown.add(batch * processes)
  except tf.errors.InvalidArgumentError as e:
    raise errors.DatasetError(
        f'an image of {split} in {source} cannot be decoded '
        f'({e.message.splitlines()[0]}): remove it, then run the same '
        f'command again') from e
  if done + written < rows.count:
    reason = rows.stopped_by()
    raise errors.DatasetError(
        f'{split} of {source} ended after {done + written:,} of this '
        f'process\'s {rows.count:,} images{": " + reason if reason else ""}; '
        f'the images written so far stay, and the same command goes on from '
        f'them')
  return distributed.all_processes(
      np.asarray((done, written), np.int64)).sum(0)
