"""The training set's mean and colour PCA: from the config or a stats file.

`--mode=stats` writes WORKDIR/dataset_stats.npz; pointing
--config.dataset.stats_file at it makes training and evaluation use the
measured values instead of the released ImageNet ones (the mean that is
subtracted is device_preprocessing.mean). No TensorFlow here: the train step
needs the mean on machines without it.
"""

import dataclasses

import numpy as np

from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files

FILE_NAME = 'dataset_stats.npz'


@dataclasses.dataclass(frozen=True)
class Stats:
  mean_image: np.ndarray   # (resize_size, resize_size, 3), 0-255
  mean_rgb: np.ndarray     # (3,)
  pca_eigvals: np.ndarray  # (3,) square roots of the eigenvalues, descending
  pca_eigvecs: np.ndarray  # (3, 3) columns are the eigenvectors
  examples: int


def save(path: str, stats: Stats) -> None:
  with files.atomic_write(path, 'wb') as f:
    np.savez(f, **dataclasses.asdict(stats))


def load(path: str) -> Stats:
  try:
    with np.load(path) as data:
      return Stats(**{f.name: data[f.name]
                      for f in dataclasses.fields(Stats)})
  except (OSError, KeyError, ValueError) as e:
    raise errors.UserError(
        f'cannot read dataset.stats_file {path} ({e}): make it with '
        f'--mode=stats') from e


def from_sums(image_sum, pixel_outer_sum, examples: int) -> Stats:
  """Mean and PCA from sums over `examples` images of float64 RGB pixels:
  of the images (H, W, 3) and of each pixel's outer product (3, 3)."""
  pixels = examples * image_sum.shape[0] * image_sum.shape[1]
  mean_rgb = image_sum.sum((0, 1)) / pixels
  covariance = pixel_outer_sum / pixels - np.outer(mean_rgb, mean_rgb)
  eigvals, eigvecs = np.linalg.eigh(covariance)
  order = np.argsort(eigvals)[::-1]
  eigvals, eigvecs = eigvals[order], eigvecs[:, order]
  eigvecs = eigvecs * np.where(eigvecs.sum(0) > 0, -1.0, 1.0)  # fix the signs
  return Stats(image_sum / examples, mean_rgb,
               np.sqrt(np.maximum(eigvals, 0.0)), eigvecs, examples)


def from_config(config) -> "Stats | None":
  """The stats of dataset.stats_file, or None when it is not set."""
  return load(config.dataset.stats_file) if config.dataset.stats_file else None


def pca(config) -> tuple[np.ndarray, np.ndarray]:
  """(sqrt-eigenvalues, eigenvector columns) for the PCA lighting."""
  stats = from_config(config)
  if stats is not None:
    return stats.pca_eigvals, stats.pca_eigvecs
  return (np.asarray(config.dataset.pca_eigvals),
          np.asarray(config.dataset.pca_eigvecs))
