"""tf.data input: sources, the paper's augmentation, batches for the device.

Every source yields (encoded image bytes, label), so the built-in dataset, a
folder of class folders and TFDS datasets share one decoding and
augmentation path. Train batches carry uint8 pixels and the PCA lighting
shift drawn for each image; the device subtracts the mean and adds the shift
(see train.normalize), which keeps host-to-device traffic at a byte a pixel.
"""

import dataclasses
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import builtin_data
from alexnet_jax import errors

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


class DatasetError(errors.UserError):
  """A dataset is missing or unusable; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Encoded examples of one split and what is known about them."""
  dataset: tf.data.Dataset   # (image bytes, int64 label)
  num_examples: int
  class_names: tuple[str, ...]


def _folder_source(root: str, split: str) -> Source:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DatasetError(f'no folder {split_dir}: a folder dataset needs '
                       f'{root}/<split>/<class name>/<image files>')
  class_names = tuple(sorted(
      d for d in os.listdir(split_dir)
      if os.path.isdir(os.path.join(split_dir, d))))
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(split_dir, name)
    for file in sorted(os.listdir(folder)):
      if file.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(folder, file))
        labels.append(label)
  if not paths:
    raise DatasetError(f'no image files under {split_dir}/<class name>/')
  files = tf.data.Dataset.from_tensor_slices(
      (paths, np.asarray(labels, np.int64)))
  return Source(files.map(lambda p, y: (tf.io.read_file(p), y),
                          num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True),
                len(paths), class_names)


def builtin_dir(config) -> str:
  root = config.dataset.data_dir or os.path.join(
      os.path.expanduser('~'), '.cache', 'alexnet_jax')
  return os.path.join(root, f'builtin_v{builtin_data.VERSION}_seed'
                      f'{config.seed}_{config.dataset.builtin_train_per_class}'
                      f'_{config.dataset.builtin_eval_per_class}')


def _tfds_source(config, split: str) -> Source:
  import tensorflow_datasets as tfds  # only needed for TFDS datasets
  download_config = tfds.download.DownloadConfig(
      manual_dir=config.dataset.manual_dir)
  try:
    builder = tfds.builder(config.dataset.name,
                           data_dir=config.dataset.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'unknown dataset.name {config.dataset.name!r}: use '
                       f'builtin, folder:PATH or a TFDS dataset name') from e
  if not builder.is_prepared():
    if config.dataset.name.startswith('imagenet2012'):
      manual = config.dataset.manual_dir or '<dataset.manual_dir>'
      missing = [f for f in ('ILSVRC2012_img_train.tar',
                             'ILSVRC2012_img_val.tar')
                 if not os.path.exists(os.path.join(manual, f))]
      if missing:
        raise DatasetError(
            f'ImageNet is not prepared and {", ".join(missing)} not found in '
            f'{manual}: download them from image-net.org and set '
            f'--config.dataset.manual_dir to their folder')
    builder.download_and_prepare(download_config=download_config)
  features = builder.info.features
  dataset = builder.as_dataset(
      split=split, decoders={'image': tfds.decode.SkipDecoding()},
      shuffle_files=False)
  dataset = dataset.map(lambda ex: (ex['image'], ex['label']))
  return Source(dataset, builder.info.splits[split].num_examples,
                tuple(features['label'].names))


def source(config, split: str) -> Source:
  """The encoded examples of `split` of config.dataset.name."""
  name = config.dataset.name
  if name == 'builtin':
    directory = builtin_data.ensure(builtin_dir(config), config.seed, {
        'train': config.dataset.builtin_train_per_class,
        'validation': config.dataset.builtin_eval_per_class})
    return _folder_source(directory, split)
  if name.startswith('folder:'):
    return _folder_source(name[len('folder:'):], split)
  return _tfds_source(config, split)


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG, PNG, BMP or GIF, grey or colour, as uint8 RGB."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def resize_and_centre(image: tf.Tensor, resize_size: int) -> tf.Tensor:
  """The paper's 256x256 image: shorter side to resize_size, centre square."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = resize_size / tf.minimum(height, width)
  new_h = tf.maximum(resize_size, tf.cast(tf.round(height * scale), tf.int32))
  new_w = tf.maximum(resize_size, tf.cast(tf.round(width * scale), tf.int32))
  image = tf.image.resize(image, (new_h, new_w), method='bilinear',
                          antialias=True)
  top = (new_h - resize_size) // 2
  left = (new_w - resize_size) // 2
  image = image[top:top + resize_size, left:left + resize_size]
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def pca_lighting(seed: tf.Tensor, eigvals, eigvecs, std: float) -> tf.Tensor:
  """The colour shift V (alpha * s), alpha ~ N(0, std), one per image."""
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  return tf.linalg.matvec(tf.constant(eigvecs, tf.float32),
                          alpha * tf.constant(eigvals, tf.float32))


def train_preprocess(config, encoded, label, seed):
  """Random image_size crop of the centre square, flip with p=0.5, lighting."""
  image = resize_and_centre(decode(encoded), config.resize_size)
  crop_seed, flip_seed, light_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  size = config.image_size
  image = tf.image.stateless_random_crop(image, (size, size, 3), crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  lighting = pca_lighting(light_seed, config.dataset.pca_eigvals,
                          config.dataset.pca_eigvecs,
                          config.dataset.lighting_std)
  return {'image': image, 'label': tf.cast(label, tf.int32),
          'lighting': lighting}


def eval_crops(image: tf.Tensor, size: int, crops: int) -> tf.Tensor:
  """The centre crop (crops=1) or the paper's 10: corners, centre, mirrors."""
  full = tf.shape(image)[0]
  centre = (full - size) // 2
  if crops == 1:
    return image[centre:centre + size, centre:centre + size]
  if crops != 10:
    raise ValueError(f'eval.crops must be 1 or 10, got {crops}')
  far = full - size
  offsets = ((0, 0), (0, far), (far, 0), (far, far), (centre, centre))
  five = tf.stack([image[y:y + size, x:x + size] for y, x in offsets])
  return tf.concat([five, tf.reverse(five, axis=[2])], axis=0)


def eval_preprocess(config, encoded, label):
  image = resize_and_centre(decode(encoded), config.resize_size)
  return {'image': eval_crops(image, config.image_size, config.eval.crops),
          'label': tf.cast(label, tf.int32)}


def process_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise errors.UserError(f'batch_size {global_batch} must divide evenly among '
                     f'{jax.process_count()} processes')
  return global_batch // jax.process_count()


def train_dataset(config, src: Source) -> tf.data.Dataset:
  """Endless shuffled, augmented batches for this process.

  Random choices use stateless ops seeded by (seed, position in the stream),
  so the stream is the same on every run with the same seed.
  """
  ds = src.dataset.shard(jax.process_count(), jax.process_index())
  ds = ds.cache() if src.num_examples <= 100_000 else ds
  ds = ds.shuffle(min(config.dataset.shuffle_buffer, src.num_examples),
                  seed=config.seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().map(
      lambda i, ex: train_preprocess(
          config, ex[0], ex[1],
          tf.stack([tf.cast(config.seed, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(process_batch_size(config.batch_size), drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches(config, src: Source) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this process's share exactly once, in full batches.

  The last batch is padded with zeros; 'mask' is 1 for real examples only.
  """
  batch = process_batch_size(config.eval.batch_size)
  ds = src.dataset.shard(jax.process_count(), jax.process_index())
  ds = ds.map(lambda x, y: eval_preprocess(config, x, y),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
  for b in ds.as_numpy_iterator():
    real = b['label'].shape[0]
    b['mask'] = np.ones(real, np.float32)
    if real < batch:
      b = {k: np.concatenate([v, np.zeros((batch - real,) + v.shape[1:],
                                          v.dtype)]) for k, v in b.items()}
    yield b


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)
