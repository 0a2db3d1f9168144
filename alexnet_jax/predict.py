"""--mode=predict: the top-5 classes of image files, from a checkpoint.

Each image goes through the evaluation path of training (the centre crop,
or the paper's 10 crops with their softmax averaged, as config.eval.crops
says), so a file from the validation set gets the probabilities evaluation
gave it. Class names come from the dataset's metadata.
"""

import json
import os

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import dataset_stats
from alexnet_jax import errors
from alexnet_jax import evaluate
from alexnet_jax import input_pipeline
from alexnet_jax import models
from alexnet_jax import parallel
from alexnet_jax import train


def image_files(paths) -> list[str]:
  """The files named, and the image files under the folders named, sorted."""
  files = []
  for path in map(os.path.expanduser, paths):
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name)
                     for root, _, names in os.walk(path) for name in names
                     if name.lower().endswith(input_pipeline.IMAGE_EXTENSIONS))
      if not found:
        raise errors.UserError(f'no image files under {path}: give image '
                               f'files or folders that hold some')
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise errors.UserError(f'{path} does not exist: give image files or '
                             f'folders with --images')
  return files


def restore_to_look_at(mode: str, config, workdir: str, checkpoint: str,
                       allow_config_change: bool):
  """(parameters, step, class names) of a checkpoint, for --mode=predict,
  figures or export, which run in one process."""
  if jax.process_count() > 1:
    raise errors.UserError(f'--mode={mode} runs in one process: start it '
                           f'without --coordinator_address or a launcher')
  names = input_pipeline.class_names(config)
  if len(names) != config.model.num_classes:
    raise errors.UserError(
        f'{config.dataset.name} has {len(names)} classes but the network '
        f'{config.model.num_classes}: set --config.dataset.name to the '
        f'dataset it was trained on')
  params, step = evaluate.restore_params(
      config, parallel.make_mesh(config), f'{workdir}@{checkpoint}',
      allow_config_change)
  return params, step, names


def load_image(config, path: str) -> np.ndarray:
  """The evaluation crop(s) of one file, as uint8."""
  try:
    return augment.eval_example(config, tf.io.read_file(path), 0)[
        'image'].numpy()
  except tf.errors.OpError as e:
    reason = e.message.splitlines()[0] if e.message else type(e).__name__
    raise errors.UserError(f'cannot read {path} as an image ({reason}): '
                           f'leave it out or convert it to JPEG or PNG') from e


def probabilities_fn(config):
  """A compiled (params, uint8 images or crops) -> softmax, on one device."""
  model, mean = models.build(config), dataset_stats.mean(config)
  return jax.jit(lambda params, images: train.mean_probabilities(
      model, (params,), images, mean))


def top5(probabilities: np.ndarray, class_names) -> list[list]:
  """[[class name, probability], ...], the most probable first."""
  best = np.argsort(-probabilities, kind='stable')[:5]
  return [[class_names[i], round(float(probabilities[i]), 6)] for i in best]


def run(config, workdir: str, checkpoint: str, paths,
        allow_config_change: bool = False) -> list[dict]:
  """Print (and return) one JSON line per image: its top 5 classes."""
  files = image_files(paths)
  params, step, names = restore_to_look_at('predict', config, workdir,
                                           checkpoint, allow_config_change)
  probabilities = probabilities_fn(config)
  results = []
  batch = config.eval.batch_size
  for start in range(0, len(files), batch):
    chunk = files[start:start + batch]
    images = np.stack([load_image(config, path) for path in chunk])
    for path, p in zip(chunk, np.asarray(probabilities(params, images))):
      result = {'image': path, 'step': step, 'top5': top5(p, names)}
      print(json.dumps(result), flush=True)
      results.append(result)
  return results
