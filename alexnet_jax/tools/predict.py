"""--mode=predict: the top-5 classes of image files, from a checkpoint.

Each image goes through the evaluation path of training (the centre crop,
or the paper's 10 crops with their softmax averaged, as config.eval.crops
says), so a file from the validation set gets the probabilities evaluation
gave it. Class names come from the dataset's metadata. Files that cannot
be used are named with the reason and left out, and repaired ones (a
truncated JPEG) are named, as training screens its dataset.
"""

import json
import os

import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import screening
from alexnet_jax.data import sources
from alexnet_jax.runtime import errors
from alexnet_jax.tools import inference


def image_files(paths) -> list[str]:
  """The files named, and the image files under the folders named, sorted."""
  files = []
  for path in map(os.path.expanduser, paths):
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name)
                     for root, _, names in os.walk(path) for name in names
                     if name.lower().endswith(sources.IMAGE_EXTENSIONS))
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


def load_image(config, path: str) -> np.ndarray:
  """The evaluation crop(s) of one file, as uint8."""
  try:
    return augment.eval_example(augment.Crops.of(config),
                                tf.io.read_file(path), 0)[
        'image'].numpy()
  except tf.errors.OpError as e:
    reason = e.message.splitlines()[0] if e.message else type(e).__name__
    raise errors.UserError(f'cannot read {path} as an image ({reason}): '
                           f'leave it out or convert it to JPEG or PNG') from e


def run(config, workdir: str, checkpoint: str, paths,
        allow_config_change: bool = False) -> list[dict]:
  """Print (and return) one JSON line per image: its top 5 classes."""
  named = image_files(paths)
  files = [path for path, shape in zip(named, screening.check(named))
           if shape is not None]
  if not files:
    raise errors.UserError(
        f'none of the {len(named)} files given can be read as an image (each '
        f'is named above with the reason): give JPEG or PNG files')
  params, step, names = inference.load('predict', config, workdir,
                                       checkpoint, allow_config_change)
  probabilities = inference.probabilities_fn(config)
  results = []
  batch = config.eval.batch_size
  for start in range(0, len(files), batch):
    chunk = files[start:start + batch]
    images = np.stack([load_image(config, path) for path in chunk])
    for path, p in zip(chunk, np.asarray(probabilities(params, images))):
      result = {'image': path, 'step': step, 'top5': inference.top5(p, names)}
      print(json.dumps(result), flush=True)
      results.append(result)
  return results
