"""tf.data input: sources, this process's share, and batches for the device.

Every source yields (encoded image bytes, label), so the built-in dataset, a
folder of class folders and TFDS datasets share one decoding and
augmentation path (augment.py); a dataset small enough may instead be kept
decoded in memory (decoded_in_memory). Train batches carry uint8 pixels and
the PCA lighting shift drawn for each image; the device subtracts the mean
and adds the shift (normalization.py), which keeps host-to-device traffic at
a byte a pixel.

The train stream is a pure function of the seed, the batch size and the
position: position p is example p % n of epoch p // n, in an order drawn from
the seed and the epoch, augmented with randomness drawn (a global batch at a
time) from the seed, p's global batch and its place in it. Each process
reads its part of every global batch. A run that resumes at step s starts the
stream at global batch s and sees exactly the examples and crops it would
have seen, with nothing to store but the step.

Every function given to tf.data is marked do_not_convert: they have no
Python control flow on tensors for AutoGraph to rewrite, and rewriting them
cost every command 1-1.5 s of CPU time at start-up.
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

from alexnet_jax import augment
from alexnet_jax import builtin_data
from alexnet_jax import config as config_lib
from alexnet_jax import distributed
from alexnet_jax import errors
from alexnet_jax import normalization
from alexnet_jax import progress
from alexnet_jax import screening

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_ENDLESS = 2**62
POSITION = 'position'   # an example's place in the job's train stream
_INDEX = 'index'        # the example a position reads, with random access


class DatasetError(errors.UserError):
  """A dataset is missing or unusable; the message says how to fix it."""


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
    raise DatasetError(
        f'no folder {split_dir}: a folder dataset needs '
        f'{root}/<split>/<class name>/<image files>'
        + (f'; it has {", ".join(present)}: set --config.dataset.train_split '
           f'and --config.dataset.eval_split to those' if present else ''))
  return split_dir


def _folder_source(root: str, split: str, cache_dir: str) -> Source:
  if os.path.exists(os.path.join(root, UNFINISHED_COPY)):
    raise DatasetError(f'{root} is a --mode=prepare copy that did not finish: '
                       f'run the same prepare command to complete it')
  split_dir = _split_dir(root, split)
  class_names = _class_names(split_dir, root)
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(split_dir, name)
    try:
      files = sorted(os.listdir(folder)) if os.path.isdir(folder) else ()
    except OSError as e:
      logging.warning('skipping class folder %s: %s', folder,
                      (e.strerror or str(e)).lower())
      files = ()
    for file in files:
      if file.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(folder, file))
        labels.append(label)
  if not paths:
    raise DatasetError(f'no image files under {split_dir}/<class name>/')
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
    raise DatasetError(f'no decodable image files under {split_dir}')
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

IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def check_archive(path: str) -> list[tarfile.TarInfo]:
  """Read every member header of a tar, so a damaged or truncated one is
  named before an hour is spent on it. Returns the headers."""
  try:
    with tarfile.open(path) as archive:
      members = archive.getmembers()
      if not members:
        raise tarfile.ReadError('it holds no files')
      return members
  except (tarfile.TarError, EOFError, OSError) as e:
    reason = ('not a tar archive' if 'could not be opened' in str(e)
              else str(e))
    raise DatasetError(f'{path} is damaged ({reason}): download it '
                       f'again') from e


def _manual_dir(config, builder) -> str:
  """Where ImageNet's archives are: dataset.manual_dir, else TFDS's own
  default, <data_dir>/downloads/manual."""
  if config.dataset.manual_dir:
    return config.dataset.manual_dir
  default = os.path.join(builder.data_dir_root, 'downloads', 'manual')
  for name in IMAGENET_ARCHIVES:
    if not os.path.exists(os.path.join(default, name)):
      raise DatasetError(
          f'ImageNet is not prepared and {name} is in neither '
          f'dataset.manual_dir (not set) nor {default}: download the archives '
          f'from image-net.org and put them in one of the two (set '
          f'--config.dataset.manual_dir=FOLDER)')
  return default


def _prepare_tfds(config, builder, tfds) -> None:
  """Build a TFDS dataset that is not prepared yet, from archives the user
  gave (ImageNet); nothing is downloaded at run time."""
  name = config.dataset.name
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise DatasetError(
        f'{name} is not prepared in {builder.data_dir_root} and needs a '
        f'download, which this program never starts by itself: get it first '
        f'with `tfds build {name} --data_dir={builder.data_dir_root}` on a '
        f'machine with network access, then point --config.dataset.data_dir '
        f'at that folder')
  manual = _manual_dir(config, builder)
  if name.startswith('imagenet2012'):
    for archive in IMAGENET_ARCHIVES:
      path = os.path.join(manual, archive)
      if not os.path.exists(path):
        raise DatasetError(f'ImageNet is not prepared and {archive} is not in '
                           f'{manual}: download it from image-net.org, or '
                           f'set --config.dataset.manual_dir to the folder '
                           f'that holds it')
      check_archive(path)
  try:
    with progress.tfds_bars_as_lines(config, tfds):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
  except (tarfile.TarError, EOFError, zlib.error) as e:
    raise DatasetError(f'an archive in {manual} is damaged ({e}): download '
                       f'it again') from e


def _tfds_source(config, split: str) -> Source:
  import tensorflow_datasets as tfds  # only needed for TFDS datasets
  try:
    builder = tfds.builder(config.dataset.name,
                           data_dir=config.dataset.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'unknown dataset.name {config.dataset.name!r}: use '
                       f'builtin, folder:PATH or a TFDS dataset name') from e
  if not builder.is_prepared():
    _prepare_tfds(config, builder, tfds)
  if split not in builder.info.splits:
    raise DatasetError(f'{config.dataset.name} has no split {split!r}: use '
                       f'one of {", ".join(builder.info.splits)}')
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


def source(config, split: str) -> Source:
  """This process's share of `split` of config.dataset.name."""
  name = config.dataset.name
  if name == 'builtin':
    directory = builtin_data.ensure(*builtin_data.settings(config))
    return _folder_source(directory, split, config_lib.cache_root(config))
  if name.startswith('folder:'):
    return _folder_source(name[len('folder:'):], split,
                          config_lib.cache_root(config))
  return _tfds_source(config, split)


def _physical_memory() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def decoded_in_memory(config, src: Source) -> Source:
  """src as its 256x256 images (resize_size), decoded once and kept in
  memory, when config.dataset.decoded_in_memory; else src itself.

  Why: on a small dataset, decoding and resizing every image again each
  epoch costs the host about as much as the quickstart's train step does;
  a crop of a kept image costs a fifth of one read from its file (one
  thread, the quickstart's images: 90 against 490 us). Each crop is then a
  slice of the 256x256 image, exactly as the paper cut them. A source with
  random access keeps the whole split (every process reads any example);
  one without keeps this process's share.
  """
  side = config.resize_size
  count = src.num_examples if src.lookup is not None else src.num_local
  if not config.dataset.decoded_in_memory or not count:
    return src
  needed, memory = count * side * side * 3, _physical_memory()
  if needed > memory // 4:
    raise DatasetError(
        f'dataset.decoded_in_memory would keep {count} images of {side}x{side}'
        f' ({needed / 2**30:.1f} GiB) in memory, more than a quarter of this '
        f'machine\'s {memory / 2**30:.1f} GiB: set '
        f'--config.dataset.decoded_in_memory=False')
  encoded = (tf.data.Dataset.range(count).map(src.lookup)
             if src.lookup is not None else src.examples)
  decoded = encoded.map(
      tf.autograph.experimental.do_not_convert(
          lambda data, label: (augment.paper_image(data, side), label)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
  parts = list(read_once(decoded).as_numpy_iterator())
  images = tf.constant(np.concatenate([p[0] for p in parts]))
  labels = tf.constant(np.concatenate([p[1] for p in parts]))
  del parts
  logging.info('kept %d decoded %dx%d images in memory (%.0f MB)', count,
               side, side, needed / 1e6)

  @tf.autograph.experimental.do_not_convert
  def lookup(index):
    return tf.gather(images, index), tf.gather(labels, index)

  if src.lookup is None:
    return dataclasses.replace(
        src, examples=tf.data.Dataset.from_tensor_slices((images, labels)))
  share = _share(count)
  # Crops of kept images are slices, found without the files' shapes.
  return dataclasses.replace(
      src, examples=tf.data.Dataset.range(
          share.start, share.stop, share.step).map(lookup),
      lookup=lookup, shapes=None)


def training_source(config, split: str) -> Source:
  """source(config, split) as training and evaluation read it."""
  return decoded_in_memory(config, source(config, split))


def output_names(config, dataset_classes) -> tuple[str, ...]:
  """The name of each of the network's model.num_classes outputs.

  One rule for training and for predict, figures and export: a dataset may
  use fewer classes than the network has outputs (the rest are named
  'class N'), never more.
  """
  if len(dataset_classes) > config.model.num_classes:
    raise DatasetError(
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
  if name.startswith('folder:'):
    root = name[len('folder:'):]
    return _class_names(_split_dir(root, config.dataset.train_split), root)
  import tensorflow_datasets as tfds  # only needed for TFDS datasets
  try:
    builder = tfds.builder(name, data_dir=config.dataset.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'unknown dataset.name {name!r}: use builtin, '
                       f'folder:PATH or a TFDS dataset name') from e
  return tuple(builder.info.features['label'].names)


def spread_sample(src: Source, count: int) -> tf.data.Dataset:
  """About `count` examples of this process's share, as (bytes, label, index).

  With random access they are spread evenly over the split (a folder is in
  class order, so its first examples would be one class); otherwise they are
  the first ones, which in TFDS's shuffled records are a fair sample.
  """
  if src.lookup is not None:
    indices = np.unique(np.linspace(0, src.num_examples - 1, count,
                                    dtype=np.int64))
    return tf.data.Dataset.from_tensor_slices(indices).map(
        tf.autograph.experimental.do_not_convert(
            lambda i: (*src.lookup(i), i)))
  return src.examples.take(count).enumerate().map(
      tf.autograph.experimental.do_not_convert(
          lambda i, example: (*example, i)))


def process_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise errors.UserError(f'batch_size {global_batch} must divide evenly '
                           f'among {jax.process_count()} processes')
  return global_batch // jax.process_count()


def _epoch_order(config, num_examples: int, positions: tf.Tensor) -> tf.Tensor:
  """The example at each stream position: position mod n of epoch position
  div n, in an order drawn from the seed and the epoch.

  Eight rounds of the shuffle, not TensorFlow's default four: with four, a
  folder of a few hundred files (listed class by class) gave consecutive
  examples of one class twice as often as chance.
  """
  # The op's seeds are triples (augmentation's are pairs): zero fills them.
  seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(config.seed,
                                                             tf.int64)),
                    tf.zeros_like(positions), positions // num_examples], 1)
  return tf.raw_ops.RandomIndexShuffle(
      index=positions % num_examples, seed=seeds,
      max_index=tf.constant(num_examples - 1, tf.int64), rounds=8)


def positioned_examples(
    config, src: Source, start_step: int, local_batch: int,
    per_example: Callable[..., object],
    per_batch: Optional[Callable[[tf.Tensor, Optional[tf.Tensor]],
                                 dict[str, tf.Tensor]]] = None,
) -> tf.data.Dataset:
  """per_example(bytes, label, info) of this process's examples in order,
  from its local batch start_step on, in one parallel map.

  info is a dict of one example's tensors: its POSITION in the job's stream,
  and its row of what per_batch(step, shapes) returns for the local batch
  (so work that can be done a batch at a time is); shapes are the batch's
  images' [height, width] where the source has them (Source.shapes), else
  None. Global batch s is split among the processes in order, as
  `parallel.shard_batch` puts it together again. With random access,
  position p is example p mod n of epoch p div n in that epoch's order, so
  the stream is the same for any number of processes.
  """
  @tf.autograph.experimental.do_not_convert
  def batch_info(step):
    first = (step * jax.process_count() + jax.process_index()) * local_batch
    positions = first + tf.range(local_batch, dtype=tf.int64)
    info, shapes = {POSITION: positions}, None
    if src.lookup is not None:
      info[_INDEX] = _epoch_order(config, src.num_examples, positions)
      if src.shapes is not None:
        shapes = tf.gather(src.shapes, info[_INDEX])
    if per_batch:
      info.update(per_batch(step, shapes))
    return info

  infos = tf.data.Dataset.range(start_step, _ENDLESS).map(batch_info).unbatch()
  if src.lookup is not None:
    @tf.autograph.experimental.do_not_convert
    def example(info):
      info = dict(info)
      return per_example(*src.lookup(info.pop(_INDEX)), info)
    return infos.map(example, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)
  # A sequential source: this process's share through a shuffle buffer drawn
  # anew each epoch. Resuming re-reads (without decoding) the part of the
  # epoch already seen.
  n, seed = src.num_local, config.seed
  first_epoch, seen = divmod(start_step * local_batch, n)
  buffer = min(config.dataset.shuffle_buffer, n)
  epochs = tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(
      tf.autograph.experimental.do_not_convert(
          lambda epoch: src.examples.shuffle(
              buffer, seed=seed * 1_000_003 + epoch)))
  return tf.data.Dataset.zip((epochs.skip(seen), infos)).map(
      tf.autograph.experimental.do_not_convert(
          lambda example, info: per_example(*example, info)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(config, src: Source, start_step: int = 0) -> tf.data.Dataset:
  """Endless augmented batches for this process, from train step start_step.

  Each global batch's crops, flips and lighting are drawn at once from the
  seed and the step (augment.train_draws), and each process takes its rows
  (and finds its crops' windows, where the source has the images' shapes).
  """
  local_batch = process_batch_size(config.batch_size)
  seed = tf.constant([config.seed, 0], tf.int64)

  def this_process_draws(step, shapes):
    draws = augment.train_draws(
        config, tf.random.experimental.stateless_fold_in(seed, step),
        config.batch_size)
    first = jax.process_index() * local_batch
    draws = {k: v[first:first + local_batch] for k, v in draws.items()}
    return (draws if shapes is None
            else augment.train_windows(config, draws, shapes))

  ds = positioned_examples(
      config, src, start_step, local_batch,
      lambda encoded, label, info: augment.train_example(config, encoded,
                                                         label, info),
      this_process_draws)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


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


def eval_batches(config, src: Source,
                 global_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this process's share exactly once, in full batches.

  Padding fills the last batch, and whole batches where this process has
  fewer examples than another, so every process runs the same number of
  steps; normalization.MASK is 1 for real examples only.
  """
  batch = process_batch_size(global_batch)
  most_per_process = -(-src.num_examples // jax.process_count())
  num_batches = -(-most_per_process // batch)
  ds = src.examples.map(tf.autograph.experimental.do_not_convert(
      lambda x, y: augment.eval_example(config, x, y)),
                        num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  ds = read_once(ds.batch(batch).prefetch(tf.data.AUTOTUNE))
  # A process with no examples left (or none at all) pads from this.
  empty = {k: np.zeros((0,) + tuple(spec.shape[1:]),
                       spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  batches = ds.as_numpy_iterator()
  for _ in range(num_batches):
    b = next(batches, None) or dict(empty)
    real = b[normalization.LABEL].shape[0]
    b[normalization.MASK] = np.ones(real, np.float32)
    if real < batch:
      b = {k: np.concatenate([v, np.zeros((batch - real,) + v.shape[1:],
                                          v.dtype)]) for k, v in b.items()}
    yield b


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)
