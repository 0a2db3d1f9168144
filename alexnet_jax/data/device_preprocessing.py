"""The device half of preprocessing, and the batch it starts from.

The input pipeline sends uint8 pixels as decoded, a byte a pixel over the
host-to-device link; the device mirrors the crops drawn to be flipped,
subtracts the training set's mean and adds the PCA lighting shift drawn on
the host, all in one pass over the pixels. (Mirrored on the host, a crop cost
a tf.cond and a copy: about a twentieth of the host's time per image.) A
batch is a dict with these keys:
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.data import dataset_stats
from alexnet_jax.runtime import errors

IMAGE = 'image'        # uint8 (B, H, W, 3), or (B, crops, H, W, 3) to evaluate
LABEL = 'label'        # int32 (B,)
LIGHTING = 'lighting'  # float32 (B, 3): training only, the PCA colour shift
FLIP = 'flip'          # bool (B,): training only, mirror the crop left-right
MASK = 'mask'          # float32 (B,): evaluation only, 0 for padding


def mean(config) -> np.ndarray:
  """What the device subtracts: (3,) per channel, or (S, S, 3) per pixel.

  Per pixel is the mean image of dataset.stats_file, its centre image_size
  square for every crop, as the released code did; config.validate has
  checked that the file is set.
  """
  stats = dataset_stats.from_config(config)
  if config.dataset.mean == 'per_channel':
    return np.asarray(stats.mean_rgb if stats else config.dataset.mean_rgb,
                      np.float32)
  full, size = stats.mean_image.shape[0], config.image_size
  if full != config.resize_size:
    raise errors.UserError(
        f'{config.dataset.stats_file} was made with resize_size={full}, not '
        f'{config.resize_size}: run --mode=stats again with this config')
  top = (full - size) // 2
  return stats.mean_image[top:top + size, top:top + size].astype(np.float32)


def normalize_for_training(images: jax.Array, mean, lighting,
                           lighting_on: jax.Array, flip: jax.Array,
                           rescale_std: Optional[float] = None) -> jax.Array:
  """normalize the crops, each mirrored where `flip`, with lighting while
  `lighting_on`, and with rescale_std (the released code's
  dataset.lighting_rescale) the noisy crop divided by 1 + rescale_std."""
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  on = lighting_on.astype(jnp.float32)
  x = normalize(images, mean, lighting * on)
  if rescale_std is not None:
    x = x / (1.0 + rescale_std * on)
  return x


def normalize(images: jax.Array, mean, lighting=None) -> jax.Array:
  """uint8 pixels to the network's input: minus the mean (per channel or per
  pixel, `mean`), plus lighting."""
  x = images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)
  if lighting is not None:
    x = x + lighting[:, None, None, :]
  return x
