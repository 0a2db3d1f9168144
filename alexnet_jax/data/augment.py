"""The paper's image preprocessing, as TensorFlow ops on one encoded image.

Every crop is a window of the paper's 256x256 image: the shorter side
resized to `resize_size`, then the centre square. A random train crop is
mapped back into the original image first, so only the window is resized
(decoding it costs about what decoding the whole JPEG does); evaluation
resizes the whole 256x256 image and cuts its crops from it. For a copy
already at resize_size (--mode=prepare) the mapping is the identity and
nothing is resampled, and a 256x256 image kept decoded in memory
(sources.decoded_in_memory) is simply sliced.

Decoding goes by content, not file name: a PNG named .JPEG, grey and CMYK
JPEGs all become RGB, and a truncated JPEG decodes what is there (the rest
grey). Files that cannot be decoded at all are screened out before they get
here (screening.py).
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from alexnet_jax.data import device_preprocessing


def window_in_original(shape, resize_size: int, top, left, size):
  """[y, x, h, w] in the original image of a window of the 256x256 image.

  The window is (top, left, size) in the centre square of side resize_size;
  `shape` is the original's [height, width, ...]. For one image, or for a
  batch (shape (B, 2), top and left (B,)) to the same values.
  """
  height, width = shape[..., 0], shape[..., 1]
  side = tf.minimum(height, width)
  scale = tf.cast(side, tf.float32) / resize_size
  crop = tf.maximum(1, tf.cast(tf.round(size * scale), tf.int32))
  crop = tf.minimum(crop, side)
  y = (height - side) // 2 + tf.cast(tf.round(
      tf.cast(top, tf.float32) * scale), tf.int32)
  x = (width - side) // 2 + tf.cast(tf.round(
      tf.cast(left, tf.float32) * scale), tf.int32)
  return tf.stack([tf.minimum(y, height - crop), tf.minimum(x, width - crop),
                   crop, crop], axis=-1)


def _decode_other(encoded: tf.Tensor) -> tf.Tensor:
  """A PNG, BMP or GIF (whatever its name says) as RGB."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
  """[height, width, channels in the file] of an image file: a JPEG's from
  its header, any other's by decoding it (as RGB, so 3 channels)."""
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.io.extract_jpeg_shape(encoded),
                 lambda: tf.shape(_decode_other(encoded)))


def _resize_to_uint8(image: tf.Tensor, shape) -> tf.Tensor:
  """Bilinear resize to `shape`, as uint8.

  Plain bilinear is several times faster than antialiased and samples well
  down to half size; beyond that (images far larger than ImageNet's) it
  would alias, so filter first. The pixels go in as float32: TensorFlow's
  kernels resize float32 faster than uint8, to the same values (the resize
  timings in docs/benchmarks.md). Both filters' weights are non-negative
  and sum to one, so the result needs no clipping to 0-255.
  """
  far = tf.reduce_any(tf.shape(image)[:2] > 2 * tf.convert_to_tensor(shape))
  image = tf.cast(image, tf.float32)
  out = tf.cond(
      far,
      lambda: tf.image.resize(image, shape, method='bilinear', antialias=True),
      lambda: tf.image.resize(image, shape, method='bilinear'))
  return tf.cast(tf.round(out), tf.uint8)


def shorter_side_to(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """The whole image as RGB, resized so its shorter side is `size` (the
  paper's first step, kept as a copy by --mode=prepare)."""
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                try_recover_truncated=True,
                                acceptable_fraction=0.0),
      lambda: _decode_other(encoded))
  image.set_shape([None, None, 3])
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new_shape = tf.maximum(1, tf.cast(
      tf.round(shape * size / tf.reduce_min(shape)), tf.int32))
  return _resize_to_uint8(image, new_shape)


def decode_window(encoded: tf.Tensor, resize_size: int, top, left,
                  size: int, window: Optional[tf.Tensor] = None) -> tf.Tensor:
  """The (top, left, size) window of the 256x256 image as size x size RGB.

  `encoded` is an image file's bytes, or the 256x256 image itself as uint8
  (sources.decoded_in_memory), of which the window is a slice.
  `window` is the window in the original image (window_in_original) where
  the caller found it already, a batch at a time: found here, an image at a
  time, it costs about a tenth of a 256-px copy's time per image.
  """
  if encoded.dtype == tf.uint8:
    window = encoded[top:top + size, left:left + size]
    window.set_shape([size, size, 3])
    return window

  def jpeg():
    found = window if window is not None else window_in_original(
        tf.io.extract_jpeg_shape(encoded), resize_size, top, left, size)
    return tf.io.decode_and_crop_jpeg(
        encoded, found, channels=3, dct_method='INTEGER_FAST',
        fancy_upscaling=False, try_recover_truncated=True,
        acceptable_fraction=0.0)

  def other():
    image = _decode_other(encoded)
    y, x, h, w = tf.unstack(window if window is not None else
                            window_in_original(tf.shape(image), resize_size,
                                               top, left, size))
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])

  image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size),
                  lambda: image,
                  lambda: _resize_to_uint8(image, (size, size)))
  image.set_shape([size, size, 3])
  return image


def paper_image(encoded: tf.Tensor, resize_size: int) -> tf.Tensor:
  """The paper's 256x256 image itself (side resize_size) as uint8 RGB."""
  return decode_window(encoded, resize_size, 0, 0, resize_size)


# The keys of train_draws: one image's crop offsets (and
# device_preprocessing.FLIP and LIGHTING, which the device applies); WINDOW
# is the crop in the
# original image, where train_windows found it.
TOP, LEFT, WINDOW = 'top', 'left', 'window'


@dataclasses.dataclass(frozen=True)
class Crops:
  """What augmentation cuts: image_size crops of the resize_size square,
  and for evaluation the centre one (eval_crops=1) or the paper's 10."""
  resize_size: int
  image_size: int
  eval_crops: int = 1

  @classmethod
  def of(cls, config) -> 'Crops':
    return cls(config.resize_size, config.image_size, config.eval.crops)


def train_draws(crops: Crops, seed: tf.Tensor, count: int,
                pca: tuple[np.ndarray, np.ndarray],
                lighting_std: float) -> dict[str, tf.Tensor]:
  """The random part of `count` images' augmentation, drawn at once.

  Per image: every image_size crop offset of the 256x256 image equally
  likely (TOP, LEFT), a flip with p=0.5 (device_preprocessing.FLIP), and
  the PCA lighting shift V (alpha * s), alpha ~ N(0, lighting_std), where
  pca = (s, V) (dataset_stats.pca) (device_preprocessing.LIGHTING); the
  device applies the last two. Drawn a batch at a time because drawn an
  image at a time these few numbers cost about a tenth of the host's time
  per image.
  """
  crop_seed, flip_seed, light_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  top, left = tf.unstack(tf.random.stateless_uniform(
      [2, count], crop_seed,
      maxval=crops.resize_size - crops.image_size + 1, dtype=tf.int32))
  flip = tf.random.stateless_uniform([count], flip_seed, maxval=2,
                                     dtype=tf.int32) > 0
  eigvals, eigvecs = pca
  alpha = tf.random.stateless_normal([count, 3], light_seed,
                                     stddev=lighting_std)
  lighting = tf.linalg.matmul(alpha * tf.constant(eigvals, tf.float32),
                              tf.constant(eigvecs, tf.float32),
                              transpose_b=True)
  return {TOP: top, LEFT: left, device_preprocessing.FLIP: flip,
          device_preprocessing.LIGHTING: lighting}


def train_windows(crops: Crops, draws, shapes) -> dict[str, tf.Tensor]:
  """`draws` (rows of train_draws) with each crop's WINDOW in its original
  image, from the images' [height, width] `shapes` (B, 2), found a batch at
  a time."""
  return {**draws, WINDOW: window_in_original(
      shapes, crops.resize_size, draws[TOP], draws[LEFT], crops.image_size)}


def train_example(crops: Crops, encoded, label,
                  draws) -> dict[str, tf.Tensor]:
  """One image's crop, with the flip and lighting the device applies to
  it, as `draws` (one image's row of train_draws or train_windows) says."""
  size = crops.image_size
  image = decode_window(encoded, crops.resize_size, draws[TOP], draws[LEFT],
                        size, draws.get(WINDOW))
  return {device_preprocessing.IMAGE: image,
          device_preprocessing.LABEL: tf.cast(label, tf.int32),
          device_preprocessing.FLIP: draws[device_preprocessing.FLIP],
          device_preprocessing.LIGHTING: draws[device_preprocessing.LIGHTING]}


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


def eval_example(crops: Crops, encoded, label) -> dict[str, tf.Tensor]:
  """The 256x256 image's centre crop or 10 crops.

  Both are cut from the whole 256x256 image, so an image file and the same
  image kept decoded in memory give the same crops, and predict gives what
  evaluation gave.
  """
  square = paper_image(encoded, crops.resize_size)
  return {device_preprocessing.IMAGE: eval_crops(square, crops.image_size,
                                                 crops.eval_crops),
          device_preprocessing.LABEL: tf.cast(label, tf.int32)}
