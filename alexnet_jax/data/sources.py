"""Where examples come from: the built-in dataset, a folder of class folders
or a TFDS dataset, as this process's share of a split.

Every source yields (encoded image bytes, label), so all of them share one
decoding and augmentation path (augment.py), except those that hold the
paper's 256x256 images as pixels (raw_store.Pixels): a raw store made by
--mode=prepare, or a dataset small enough to keep decoded in memory
(decoded_in_memory).

Every function given to tf.data is marked do_not_convert: they have no
Python control flow on tensors for AutoGraph to rewrite, and rewriting them
costs every command CPU time at start-up (`benchmark --what=end_to_end`
includes it).
"""

import dataclasses
import json
import os
import tarfile
import zlib
from typing import Callable, Iterator, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import config as config_lib
from alexnet_jax.data import augment
from alexnet_jax.data import builtin_data
from alexnet_jax.data import imagenet_archives
from alexnet_jax.data import raw_store
from alexnet_jax.data import screening
from alexnet_jax.runtime import console
from alexnet_jax.runtime import distributed
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import host
from alexnet_jax.runtime import progress

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


@dataclasses.dataclass(frozen=True)
class Source:
  """One split's examples, as this process reads them."""
  examples: tf.data.Dataset  # this process's share: (image bytes, or the
                             # 256x256 image as uint8, int64 label), every
                             # process_count-th example of a folder, an even
                             # part of TFDS records
  num_local: int             # examples in this process's share
  num_examples: int          # in the whole split, over all processes
  class_names: tuple[str, ...]
  # Random access to every example of the split by index, where the source
  # has it (folders). The train stream then starts anywhere at no cost and
  # does not depend on the number of processes.
  lookup: Optional[Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]] = None
  # Every example's [height, width] by index (int32, (num_examples, 2)),
  # where screening recorded them (folders), so train crops are found a
  # batch at a time (augment.train_windows).
  shapes: Optional[tf.Tensor] = None
  # The whole split as 256x256 pixels, where the source holds them (a raw
  # store, or kept decoded in memory): the train stream then cuts a batch's
  # crops at once (stream.train_dataset).
  pixels: Optional[raw_store.Pixels] = None


def _share(count: int) -> slice:
  """This process's examples of `count`: every process_count-th one."""
  return slice(jax.process_index(), count, jax.process_count())


def _from_every_process(local: np.ndarray, count: int) -> np.ndarray:
  """The rows of all `count` items, from each process's `_share` of them."""
  processes = jax.process_count()
  padded = np.zeros((-(-count // processes),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  shares = distributed.all_processes(padded)  # (processes, width, ...)
  every = np.zeros((count,) + local.shape[1:], local.dtype)
  for process in range(processes):
    every[process::processes] = shares[process, :len(every[process::processes])]
  return every


def _class_names(split_dir: str, root: str) -> tuple[str, ...]:
  """The class order: manifest.json's 'classes' if any, else sorted folders."""
  manifest = os.path.join(root, 'manifest.json')
  if os.path.exists(manifest):
    with open(manifest) as f:
      classes = json.load(f).get('classes')
    if classes:
      return tuple(classes)
  return tuple(sorted(d for d in os.listdir(split_dir)
                      if os.path.isdir(os.path.join(split_dir, d))))


# In a --mode=prepare copy until its manifest.json marks it complete.
UNFINISHED_COPY = 'PREPARING'

# Other names a folder dataset may give a split (torchvision's layout).
_SPLIT_ALIASES = {'validation': 'val'}


def _split_dir(root: str, split: str) -> str:
  split_dir = os.path.join(root, split)
  alias = os.path.join(root, _SPLIT_ALIASES.get(split, split))
  if not os.path.isdir(split_dir) and os.path.isdir(alias):
    return alias
  if not os.path.isdir(split_dir):
    present = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d))) if (
                         os.path.isdir(root)) else []
    raise errors.DatasetError(
        f'no folder {split_dir}: a folder dataset needs '
        f'{root}/<split>/<class name>/<image files>'
        + (f'; it has {", ".join(present)}: set --config.dataset.train_split '
           f'and --config.dataset.eval_split to those' if present else ''))
  return split_dir


def _pixel_source(pixels: raw_store.Pixels, class_names) -> Source:
  """A source of the whole split's pixels; this process's share of it as
  examples (for evaluation), read in batches."""
  share = _share(len(pixels.labels))
  indices = np.arange(len(pixels.labels))[share]
  labels = tf.constant(pixels.labels)
  examples = tf.data.Dataset.from_tensor_slices(indices).batch(256).map(
      tf.autograph.experimental.do_not_convert(
          lambda i: (pixels.tf_images(i), tf.gather(labels, i)))).unbatch()
  return Source(examples, len(indices), len(pixels.labels),
                tuple(class_names), pixels=pixels)


def _folder_source(root: str, split: str, cache_dir: str,
                   resize_size: int) -> Source:
  if os.path.exists(os.path.join(root, UNFINISHED_COPY)):
    raise errors.DatasetError(
        f'{root} is a --mode=prepare copy or store that did not finish: run '
        f'the same prepare command to complete it')
  store = raw_store.manifest(root)
  if store is not None:
    return _pixel_source(raw_store.open_split(root, split, resize_size),
                         store['classes'])
  split_dir = _split_dir(root, split)
  class_names = _class_names(split_dir, root)
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(split_dir, name)
    try:
      files = sorted(os.listdir(folder)) if os.path.isdir(folder) else ()
    except OSError as e:
      console.warning(f'skipping class folder {folder}: '
                      f'{(e.strerror or str(e)).lower()}')
      files = ()
    for file in files:
      if file.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(folder, file))
        labels.append(label)
  if not paths:
    raise errors.DatasetError(f'no image files under {split_dir}/<class name>/')
  # Each process screens its share; all then know every file's shape, and
  # (0, 0) for a file left out.
  screened = screening.screen(paths[_share(len(paths))], cache_dir)
  shapes = _from_every_process(
      np.array([shape or (0, 0) for shape in screened],
               np.int32).reshape(-1, 2), len(paths))
  good = shapes[:, 0] > 0
  paths = [p for p, ok in zip(paths, good) if ok]
  labels = np.asarray([y for y, ok in zip(labels, good) if ok], np.int64)
  if not paths:
    raise errors.DatasetError(f'no decodable image files under {split_dir}')
  path_table, label_table = tf.constant(paths), tf.constant(labels)

  @tf.autograph.experimental.do_not_convert
  def lookup(index):
    return (tf.io.read_file(tf.gather(path_table, index)),
            tf.gather(label_table, index))

  share = _share(len(paths))
  examples = tf.data.Dataset.range(share.start, share.stop, share.step).map(
      lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return Source(examples, len(range(len(paths))[share]), len(paths),
                class_names, lookup, tf.constant(shapes[good]))


# TFDS warns that a dataset it has not prepared yet has no dataset_info.json;
# _prepare_tfds says what to do instead.
logging.get_absl_logger().addFilter(
    lambda record: 'has no dataset_info.json' not in record.getMessage())


def _prepare_tfds(config, builder, tfds) -> None:
  """Build a TFDS dataset that is not prepared yet, from archives the user
  gave (ImageNet); nothing is downloaded at run time."""
  name = config.dataset.name
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise errors.DatasetError(
        f'{name} is not prepared in {builder.data_dir_root} and needs a '
        f'download, which this program never starts by itself: get it first '
        f'with `tfds build {name} --data_dir={builder.data_dir_root}` on a '
        f'machine with network access, then point --config.dataset.data_dir '
        f'at that folder')
  manual = imagenet_archives.manual_folder(config, builder.data_dir_root)
  if name.startswith('imagenet2012'):
    imagenet_archives.check_folder(config, manual)
  try:
    with progress.tfds_bars_as_lines(config.progress_every_s, tfds):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
  except (tarfile.TarError, EOFError, zlib.error) as e:
    raise errors.DatasetError(f'an archive in {manual} is damaged ({e}): '
                              f'download it again') from e


def _tfds_builder(config):
  """TFDS's builder of config.dataset.name, and TFDS itself."""
  import tensorflow_datasets as tfds  # only needed for TFDS datasets
  try:
    return tfds.builder(config.dataset.name,
                        data_dir=config.dataset.data_dir), tfds
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.DatasetError(
        f'unknown dataset.name {config.dataset.name!r}: use builtin, '
        f'folder:PATH or a TFDS dataset name') from e


def _tfds_source(config, split: str) -> Source:
  builder, tfds = _tfds_builder(config)
  if not builder.is_prepared():
    _prepare_tfds(config, builder, tfds)
  if split not in builder.info.splits:
    raise errors.DatasetError(
        f'{config.dataset.name} has no split {split!r}: use one of '
        f'{", ".join(builder.info.splits)}')
  num_examples = builder.info.splits[split].num_examples
  # This process reads its own part of the records, not all of them.
  local_split = tfds.even_splits(split, n=jax.process_count())[
      jax.process_index()]
  examples = builder.as_dataset(
      split=local_split, decoders={'image': tfds.decode.SkipDecoding()},
      shuffle_files=False)
  examples = examples.map(tf.autograph.experimental.do_not_convert(
      lambda ex: (ex['image'], ex['label'])))
  return Source(examples, builder.info.splits[local_split].num_examples,
                num_examples, tuple(builder.info.features['label'].names))


def folder_root(dataset_name: str) -> Optional[str]:
  """PATH of a dataset.name 'folder:PATH', else None."""
  prefix = 'folder:'
  return (dataset_name[len(prefix):] if dataset_name.startswith(prefix)
          else None)


def source(config, split: str) -> Source:
  """This process's share of `split` of config.dataset.name."""
  name = config.dataset.name
  if name == 'builtin':
    directory = builtin_data.ensure(*builtin_data.settings(config))
    return _folder_source(directory, split, config_lib.cache_root(config),
                          config.resize_size)
  root = folder_root(name)
  if root is not None:
    return _folder_source(root, split, config_lib.cache_root(config),
                          config.resize_size)
  return _tfds_source(config, split)


def to_prepare(config, split: str) -> Source:
  """source(config, split) for --mode=prepare, which reads image files."""
  src = source(config, split)
  if src.pixels is not None:
    raise errors.UserError(f'{config.dataset.name} is a raw store already: '
                           f'train from it')
  return src


_DECODE_BATCH = 256   # images decoded, and written to a store, at a time


def decoded(encoded: tf.data.Dataset, count: int,
            side: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) batches of `count` (encoded image, label) examples,
  each image the paper's side x side square (augment.paper_image): what a
  raw store and a dataset kept in memory hold."""
  batches = encoded.map(
      tf.autograph.experimental.do_not_convert(
          lambda data, label: (augment.paper_image(data, side),
                               tf.cast(label, tf.int32))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(
          _DECODE_BATCH)
  return read_once(batches.take(-(-count // _DECODE_BATCH))
                   ).as_numpy_iterator()


def decoded_in_memory(config, src: Source) -> Source:
  """src as its 256x256 images (resize_size), decoded once and kept in
  memory (raw_store.Pixels, as a raw store holds them), when
  config.dataset.decoded_in_memory; else src itself.

  Why: on a small dataset, decoding and resizing every image again each
  epoch costs the host about as much as the quickstart's train step does,
  and a crop of a kept image costs a fraction of one read from its file
  (`benchmark --what=end_to_end` on the quickstart, with and without
  --config.dataset.decoded_in_memory). A source with random access keeps
  the whole split (every process reads any example); one without keeps
  this process's share.
  """
  side = config.resize_size
  count = src.num_examples if src.lookup is not None else src.num_local
  if (not config.dataset.decoded_in_memory or not count
      or src.pixels is not None):
    return src
  needed, memory = count * side * side * 3, host.physical_memory()
  if needed > memory // 4:
    raise errors.DatasetError(
        f'dataset.decoded_in_memory would keep {count} images of {side}x{side}'
        f' ({needed / 2**30:.1f} GiB) in memory, more than a quarter of this '
        f'machine\'s {memory / 2**30:.1f} GiB: set '
        f'--config.dataset.decoded_in_memory=False, or keep them on disk as a '
        f'raw store (--mode=prepare --config.dataset.format=raw)')
  encoded = (tf.data.Dataset.range(count).map(src.lookup)
             if src.lookup is not None else src.examples)
  images = np.empty((count, side, side, 3), np.uint8)
  labels = np.empty((count,), np.int32)
  done = 0
  for batch_images, batch_labels in decoded(encoded, count, side):
    images[done:done + len(batch_images)] = batch_images
    labels[done:done + len(batch_labels)] = batch_labels
    done += len(batch_images)
  logging.info('kept %d decoded %dx%d images in memory (%.0f MB)', count,
               side, side, needed / 1e6)
  if src.lookup is None:
    return dataclasses.replace(
        src, examples=tf.data.Dataset.from_tensor_slices((images, labels)))
  return _pixel_source(raw_store.Pixels(images, labels), src.class_names)


def training_source(config, split: str) -> Source:
  """source(config, split) as training and evaluation read it; a raw store
  larger than the memory free for the page cache is said so in one line,
  with the disk bandwidth that dataset.planned_images_per_sec needs."""
  src = decoded_in_memory(config, source(config, split))
  if src.pixels is not None and src.pixels.path is not None:
    size, free = src.pixels.images.nbytes, host.available_memory()
    if size > free:
      rate = config.dataset.planned_images_per_sec
      bandwidth = raw_store.size_text(rate * src.pixels.images[0].nbytes)
      console.warning(
          f'the raw store {src.pixels.path} ({raw_store.size_text(size)}) is '
          f'larger than this host\'s free memory ({raw_store.size_text(free)}),'
          f' so it is read from disk: {rate:,} images/sec needs {bandwidth}/s '
          f'from it')
  return src


def output_names(config, dataset_classes) -> tuple[str, ...]:
  """The name of each of the network's model.num_classes outputs.

  One rule for training and for predict, figures and export: a dataset may
  use fewer classes than the network has outputs (the rest are named
  'class N'), never more.
  """
  if len(dataset_classes) > config.model.num_classes:
    raise errors.DatasetError(
        f'{config.dataset.name} has {len(dataset_classes)} classes but '
        f'model.num_classes is {config.model.num_classes}: set '
        f'--config.model.num_classes={len(dataset_classes)}, or '
        f'--config.dataset.name to the dataset the network was trained on')
  return tuple(dataset_classes) + tuple(
      f'class {i}' for i in range(len(dataset_classes),
                                  config.model.num_classes))


def class_names(config) -> tuple[str, ...]:
  """The training split's class names in label order, from the dataset's
  metadata alone (no image is read)."""
  name = config.dataset.name
  if name == 'builtin':
    return builtin_data.CLASSES
  root = folder_root(name)
  if root is not None:
    return _class_names(_split_dir(root, config.dataset.train_split), root)
  builder, _ = _tfds_builder(config)
  return tuple(builder.info.features['label'].names)


def read_once(ds: tf.data.Dataset) -> tf.data.Dataset:
  """ds without tf.data's autotuning, for a stream read once and dropped.

  Why: deleting an autotuned iterator waits until the tuning thread wakes
  from its timed sleep (gdb: RootDataset::Iterator::~Iterator waits on
  Model::OptimizeLoop), which after JAX steps took 0-5 s, at the end of
  every evaluation. Without autotuning each parallel map runs one call per
  core, the most autotuning would give it.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)

