"""The paper's augmentation: crop offsets, flips, PCA lighting, windows."""

import io

import numpy as np
from PIL import Image
import tensorflow as tf

from alexnet_jax import config as config_lib
from alexnet_jax.data import augment
from alexnet_jax.data import dataset_stats
from alexnet_jax.data import device_preprocessing


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _config(resize_size, image_size):
  config = config_lib.default()
  config.resize_size, config.image_size = resize_size, image_size
  return config


def _draws(config, seed, count):
  return augment.train_draws(augment.Crops.of(config), seed, count,
                             dataset_stats.pca(config),
                             config.dataset.lighting_std)


def test_random_crops_reach_all_33x33_offsets_and_flip_half_the_time():
  """The host cuts the crops; the flip travels with each one for the device
  (test_steps checks that it mirrors them)."""
  # A lossless image at resize_size whose red is x and green is y, so a
  # crop's first pixels say where it was cut.
  config = _config(resize_size=40, image_size=8)   # 33 offsets a side
  y, x = np.mgrid[0:40, 0:40]
  encoded = tf.constant(_png(np.stack([x, y, 0 * x], -1).astype(np.uint8)))
  draws = 20_000
  examples = tf.data.Dataset.from_tensor_slices(
      _draws(config, tf.constant([3, 0], tf.int64), draws)).map(
          lambda d: augment.train_example(augment.Crops.of(config), encoded, 0, d),
          num_parallel_calls=tf.data.AUTOTUNE).batch(draws)
  batch = next(examples.as_numpy_iterator())
  images = batch[device_preprocessing.IMAGE].astype(int)
  red = images[:, 0, :, 0]
  left, top = red[:, 0], images[:, 0, 0, 1]
  # Each crop is a contiguous 8x8 window, not mirrored.
  np.testing.assert_array_equal(np.diff(red, axis=1), 1)
  offsets = set(zip(top.tolist(), left.tolist()))
  assert offsets == {(t, l) for t in range(33) for l in range(33)}
  flipped = batch[device_preprocessing.FLIP]
  assert abs(flipped.mean() - 0.5) < 0.02       # 4.5 standard deviations


def test_pca_lighting_has_the_paper_covariance_and_is_one_shift_per_image():
  config = config_lib.default()
  eigvals = np.asarray(config.dataset.pca_eigvals)
  eigvecs = np.asarray(config.dataset.pca_eigvecs)
  assert config.dataset.lighting_std == 0.1
  draws = 40_000
  shifts = _draws(config, tf.constant([5, 0], tf.int64), draws)[device_preprocessing.LIGHTING].numpy()
  want = eigvecs @ np.diag((0.1 * eigvals) ** 2) @ eigvecs.T
  # Standard error of the mean: 12.2 / sqrt(40000) = 0.06 for the largest.
  np.testing.assert_allclose(shifts.mean(0), 0, atol=0.3)
  np.testing.assert_allclose(np.cov(shifts.T), want, rtol=0.05,
                             atol=0.02 * want.max())
  # On the device the shift is added to every pixel of its image alike.
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), np.uint8)
  lit = np.asarray(device_preprocessing.normalize(images, (1., 2., 3.), shifts[:2]))
  plain = np.asarray(device_preprocessing.normalize(images, (1., 2., 3.)))
  np.testing.assert_allclose(lit - plain,
                             np.broadcast_to(shifts[:2, None, None],
                                             lit.shape), atol=1e-4)


def test_a_jpeg_window_decoded_in_place_matches_resize_then_crop():
  rng = np.random.default_rng(1)
  smooth = np.asarray(Image.fromarray(
      rng.integers(0, 256, (8, 10, 3), np.uint8)).resize((500, 375),
                                                          Image.BICUBIC))
  buffer = io.BytesIO()
  Image.fromarray(smooth).save(buffer, format='JPEG', quality=95)
  encoded = tf.constant(buffer.getvalue())
  # The reference: the paper's 256x256 image, then the window.
  reference = tf.image.resize(tf.io.decode_jpeg(encoded), (256, 341),
                              antialias=True)[:, 42:298]
  for top, left in ((0, 0), (32, 32), (7, 25)):
    window = augment.decode_window(encoded, 256, top, left, 224).numpy()
    want = reference[top:top + 224, left:left + 224].numpy()
    assert np.abs(window.astype(float) - want).mean() < 3.0


def test_windows_found_a_batch_at_a_time_are_those_found_one_at_a_time():
  """Training finds its crops' windows a batch at a time from the shapes
  screening recorded; the paper's crops must not change by it."""
  rng = np.random.default_rng(2)
  shapes = np.concatenate([rng.integers(1, 600, (100, 2)),
                           [[1, 1], [256, 256], [3000, 4000], [255, 900]]])
  top, left = rng.integers(0, 33, (2, len(shapes)))
  batch = augment.window_in_original(tf.constant(shapes, tf.int32), 256,
                                     top, left, 224).numpy()
  for (height, width), y, x, window in zip(shapes, top, left, batch):
    np.testing.assert_array_equal(window, augment.window_in_original(
        tf.constant([height, width, 3]), 256, y, x, 224))
    assert window[0] >= 0 and window[0] + window[2] <= height
    assert window[1] >= 0 and window[1] + window[3] <= width


def test_ten_crops_are_the_corners_centre_and_mirrors():
  image = tf.reshape(tf.range(8 * 8 * 3), (8, 8, 3))
  crops = augment.eval_crops(image, 4, 10).numpy()
  img = image.numpy()
  want = [img[0:4, 0:4], img[0:4, 4:8], img[4:8, 0:4], img[4:8, 4:8],
          img[2:6, 2:6]]
  want += [w[:, ::-1] for w in want]
  np.testing.assert_array_equal(crops, np.stack(want))
  np.testing.assert_array_equal(augment.eval_crops(image, 4, 1).numpy(),
                                img[2:6, 2:6])


def test_eval_examples_are_the_centre_windows_of_the_256_image():
  config = _config(resize_size=40, image_size=8)
  config.eval.crops = 10
  y, x = np.mgrid[0:60, 0:40]   # portrait: the centre square is rows 10-50
  encoded = tf.constant(_png(np.stack([x, y, 0 * x], -1).astype(np.uint8)))
  ten = augment.eval_example(augment.Crops.of(config), encoded, 0)['image'].numpy()
  assert ten.shape == (10, 8, 8, 3)
  assert [(c[0, 0, 1], c[0, 0, 0]) for c in ten[:5]] == [
      (10, 0), (10, 32), (42, 0), (42, 32), (26, 16)]
  config.eval.crops = 1
  centre = augment.eval_example(augment.Crops.of(config), encoded, 0)['image'].numpy()
  np.testing.assert_array_equal(centre, ten[4])


def test_a_256_image_kept_decoded_gives_the_crops_its_file_gives():
  """sources.decoded_in_memory hands augment the 256x256 image as
  uint8 instead of a file: the same seeds must cut the same crops, and
  evaluation the same crops from any file."""
  config = _config(resize_size=40, image_size=8)
  square = np.random.default_rng(2).integers(0, 256, (40, 40, 3), np.uint8)
  encoded, decoded = tf.constant(_png(square)), tf.constant(square)
  draws = _draws(config, tf.constant([5, 0], tf.int64), 50)
  for i in range(50):
    one = {key: value[i] for key, value in draws.items()}
    from_file = augment.train_example(augment.Crops.of(config), encoded, 3, one)
    from_memory = augment.train_example(augment.Crops.of(config), decoded, 3, one)
    for key in from_file:
      np.testing.assert_array_equal(from_file[key], from_memory[key])
  larger = tf.constant(_png(np.random.default_rng(3).integers(
      0, 256, (70, 53, 3), np.uint8)))   # resampled to 40x40 first
  kept = augment.paper_image(larger, 40)
  for crops in (1, 10):
    config.eval.crops = crops
    np.testing.assert_array_equal(
        augment.eval_example(augment.Crops.of(config), larger, 3)['image'],
        augment.eval_example(augment.Crops.of(config), kept, 3)['image'])
