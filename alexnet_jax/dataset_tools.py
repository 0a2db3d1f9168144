"""One-time jobs over a dataset: a 256-px copy (--mode=prepare) and its
statistics (--mode=stats).

The copy is what the paper trained from: every image with its shorter side
at resize_size, so training decodes small JPEGs. It is a folder dataset
(read it with --config.dataset.name=folder:WORKDIR) whose manifest.json
keeps the source's class order, so labels mean the same in both.
"""

import json
import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import dataset_stats
from alexnet_jax import errors
from alexnet_jax import input_pipeline

JPEG_QUALITY = 95


def prepare(config, out_dir: str) -> None:
  """Write the train and eval splits to out_dir at resize_size."""
  manifest_path = os.path.join(out_dir, 'manifest.json')
  if os.path.exists(manifest_path):
    raise errors.UserError(f'{out_dir} already holds a prepared copy: train '
                           f'with --config.dataset.name=folder:{out_dir}')
  counts = {}
  for split in dict.fromkeys((config.dataset.train_split,
                             config.dataset.eval_split)):
    src = input_pipeline.source(config, split)
    for name in src.class_names:
      os.makedirs(os.path.join(out_dir, split, name), exist_ok=True)
    names = tf.constant(src.class_names)
    folder = os.path.join(out_dir, split)

    def write(index, example, names=names, folder=folder):
      encoded, label = example
      # Names from the global index, so processes never collide.
      number = index * jax.process_count() + jax.process_index()
      path = tf.strings.join([folder, '/', tf.gather(names, label), '/',
                              tf.strings.as_string(number, width=8, fill='0'),
                              '.jpeg'])
      image = augment.shorter_side_to(encoded, config.resize_size)
      tf.io.write_file(path, tf.io.encode_jpeg(image, quality=JPEG_QUALITY))
      return index

    written = src.examples.enumerate().map(
        write, num_parallel_calls=tf.data.AUTOTUNE)
    written = written.ignore_errors()
    done = set(written.as_numpy_iterator())
    for index in sorted(set(range(src.num_local)) - done):
      logging.warning('skipped example %d of %s: cannot be decoded', index,
                      split)
    counts[split] = len(done)
    print(f'{split}: {len(done)} of {src.num_local} images written to '
          f'{folder}', flush=True)
  if jax.process_index() == 0:
    with open(manifest_path + '.tmp', 'w') as f:
      json.dump({'classes': list(src.class_names),
                 'resize_size': config.resize_size,
                 'source': config.dataset.name, 'images': counts}, f)
    os.replace(manifest_path + '.tmp', manifest_path)
  print(f'train from the copy with --config.dataset.name=folder:{out_dir}',
        flush=True)


def _image_sums(encoded, label, position, resize_size):
  del label, position
  image = tf.cast(augment.decode_window(encoded, resize_size, 0, 0,
                                        resize_size), tf.float64)
  pixels = tf.reshape(image, (-1, 3))
  return image, tf.einsum('pi,pj->ij', pixels, pixels)


def stats(config, workdir: str) -> dataset_stats.Stats:
  """The train split's mean image, mean colour and RGB PCA, saved in workdir.

  Over a random sample of dataset.stats_examples images (0: all), each the
  paper's resize_size square.
  """
  src = input_pipeline.source(config, config.dataset.train_split)
  sample = src.num_local if config.dataset.stats_examples <= 0 else min(
      config.dataset.stats_examples, src.num_local)
  ds = input_pipeline.positioned_examples(config, src, 0, sample).take(sample)
  ds = ds.map(lambda *ex: _image_sums(*ex, config.resize_size),
              num_parallel_calls=tf.data.AUTOTUNE).batch(64)
  size = config.resize_size
  image_sum, outer_sum = np.zeros((size, size, 3)), np.zeros((3, 3))
  for images, outer in ds.as_numpy_iterator():
    image_sum += images.sum(0)
    outer_sum += outer.sum(0)
  result = dataset_stats.from_sums(image_sum, outer_sum, sample)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, dataset_stats.FILE_NAME)
  dataset_stats.save(path, result)
  print(f'statistics of {sample} images saved to {path}\n'
        f'  mean_rgb {np.round(result.mean_rgb, 2).tolist()}\n'
        f'  pca_eigvals {np.round(result.pca_eigvals, 2).tolist()}\n'
        f'  pca_eigvecs {np.round(result.pca_eigvecs, 4).tolist()}\n'
        f'use them with --config.dataset.stats_file={path}', flush=True)
  return result
