"""Finding the files of a folder dataset that cannot be used, once.

Every file is decoded once (the part training uses); those that fail are
left out and named with the reason, and repaired ones (truncated, CMYK,
misnamed) are named too. The result, with every usable file's height and
width (from which training finds its crops a batch at a time), is kept in a
cache keyed by the files' names, sizes and times, so a dataset is screened
in full once, not on every run. Files that could not be read at all
(permissions, a dangling link, an I/O error) are not cached as bad: they are
tried again.
"""

import hashlib
import json
import os
import re
from typing import Optional

import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.runtime import console
from alexnet_jax.runtime import files


Shape = tuple[int, int]  # an image's [height, width]


def _screen_file_kinds(
    paths: list[str]) -> dict[int, tuple[bool, bool, int, Shape]]:
  """Decode every file once; for each that decodes: (is JPEG, ends with the
  JPEG end marker, colour channels in the file, [height, width]). Missing
  indices failed."""

  @tf.autograph.experimental.do_not_convert
  def check(index, path):
    data = tf.io.read_file(path)
    # Decode all that training can use: the centre square. Raises (and the
    # file is left out) if it cannot be decoded.
    decoded = augment.paper_image(data, 256)
    with tf.control_dependencies([decoded]):  # unused, so kept explicitly
      index = tf.identity(index)
    shape = augment.image_shape(data)
    complete = tf.strings.substr(data, tf.strings.length(data) - 2, 2) == (
        b'\xff\xd9')
    return index, tf.io.is_jpeg(data), complete, shape

  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
      check, num_parallel_calls=tf.data.AUTOTUNE)
  # In batches: taken from tf.data one at a time, the results cost about
  # as much again as screening small images such as the quickstart's.
  kinds = {}
  for indices, jpeg, complete, shapes in ds.ignore_errors().batch(
      4096).as_numpy_iterator():
    kinds.update(zip(indices.tolist(), zip(
        jpeg.tolist(), complete.tolist(), shapes[:, 2].tolist(),
        map(tuple, shapes[:, :2].tolist()))))
  return kinds


def _unreadable(path: str) -> Optional[str]:
  """Why the file cannot be read at all (permissions, a dangling symlink or
  a loop, an I/O error), or None. Such a file may be fixed without its
  size or time changing, so it is checked again on every run."""
  try:
    with open(path, 'rb') as f:
      f.read(1)
  except OSError as e:
    return (e.strerror or str(e)).lower()
  return None


def _decode_failure(path: str) -> str:
  """Why a readable file failed to decode, in TensorFlow's words."""
  try:
    augment.paper_image(tf.io.read_file(path), 256)
  except tf.errors.OpError as e:
    message = e.message.splitlines()[0] if e.message else type(e).__name__
    # TensorFlow wraps the reason in the names of its graph and op.
    return re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', message)
  return 'not a decodable image'


def check(paths: list[str]) -> list[Optional[Shape]]:
  """screen() without its cache, for a few files a user names (predict):
  each file's [height, width], or None for one that cannot be used; each
  file left out or repaired is named, with the reason, on every run."""
  return _screen_now(paths)[0]


def _screen_now(
    paths: list[str]) -> tuple[list[Optional[Shape]], list[str]]:
  """(each file's [height, width] or None, the files that cannot be read);
  each file left out is logged with its reason, and each repaired one."""
  if not paths:
    return [], []
  kinds = _screen_file_kinds(paths)
  bad, unreadable = [], []
  for i, path in enumerate(paths):
    if i in kinds:
      continue
    reason = _unreadable(path)
    if reason is None:
      reason = _decode_failure(path)
      bad.append(path)
    else:
      unreadable.append(path)
    console.warning(f'skipping {path}: {reason}')
  repairs = {
      'truncated JPEG, missing part filled grey':
          [p for i, p in enumerate(paths) if i in kinds and kinds[i][0]
           and not kinds[i][1]],
      'not a JPEG despite its name, decoded as what it is':
          [p for i, p in enumerate(paths) if i in kinds and not kinds[i][0]
           and p.lower().endswith(('.jpg', '.jpeg'))],
      'grey or CMYK JPEG, converted to RGB':
          [p for i, p in enumerate(paths) if i in kinds and kinds[i][0]
           and kinds[i][2] != 3],
  }
  for what, repaired in repairs.items():
    for path in repaired:
      console.warning(f'repaired {path}: {what}')
  if bad or unreadable or any(repairs.values()):
    console.warning(f'checked {len(paths)} files: '
                    f'{len(bad) + len(unreadable)} skipped, '
                    f'{sum(map(len, repairs.values()))} repaired')
  return [kinds[i][3] if i in kinds else None
          for i in range(len(paths))], unreadable


# The cache's format: a dataset whose cache has another is screened anew.
_CACHE_VERSION = 2


def _file_key(path: str) -> str:
  try:
    st = os.stat(path)
  except OSError:
    return f'{path}\tunreadable\n'
  return f'{path}\t{st.st_size}\t{st.st_mtime_ns}\n'


def screen(paths: list[str], cache_dir: str) -> list[Optional[Shape]]:
  """Each file's [height, width], or None for one that cannot be used; each
  bad, unreadable or repaired file is logged with the reason.

  The result is kept in cache_dir, keyed by the files' names, sizes and
  times, so a dataset is decoded in full once, not on every run. Files that
  could not be read are not taken as bad: they are tried again on every run.
  """
  fingerprint = hashlib.sha256()
  for path in paths:
    fingerprint.update(_file_key(path).encode())
  cache = os.path.join(cache_dir, f'screened_v{_CACHE_VERSION}',
                       fingerprint.hexdigest()[:32] + '.json')
  if os.path.exists(cache):
    with open(cache) as f:
      cached = json.load(f)
    shapes = [tuple(shape) if shape else None for shape in cached['shapes']]
    unreadable = set(cached['unreadable'])
    retried = [i for i, path in enumerate(paths) if path in unreadable]
    retried_shapes, _ = _screen_now([paths[i] for i in retried])
    for i, shape in zip(retried, retried_shapes):
      shapes[i] = shape
    return shapes
  shapes, unreadable = _screen_now(paths)
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with files.atomic_write(cache) as f:
      json.dump({'shapes': shapes, 'unreadable': unreadable}, f)
  except OSError as e:  # a read-only cache only costs time
    console.warning(f'cannot keep the screening result in {cache}: {e}')
  return shapes
