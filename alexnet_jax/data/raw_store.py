"""The paper's 256x256 images as raw uint8 RGB pixels, read by index: the
raw store that --mode=prepare writes with --config.dataset.format=raw, and
a small dataset kept decoded in memory (dataset.decoded_in_memory). Both
are `Pixels`, and the train stream reads both one way (stream.py).

A store is a folder, read with --config.dataset.name=folder:PATH:
  manifest.json          format, classes, resize_size, images per split;
                         written last: a store without it is unfinished
  <split>/images.npy     (N, S, S, 3) uint8, S = resize_size
  <split>/labels.npy     (N,) int32
  <split>/written.P-p    while preparing: the rows process p of P has written

Why memory-mapped NumPy arrays and not ArrayRecord: every record has the
same size, so an image is at its index times S*S*3 bytes, with no index to
keep and nothing to decode; a batch's training crops are one NumPy gather
from the mapped file (Pixels.crops); and the page cache holds the store in
RAM where it fits, with no second copy in the process. ArrayRecord's
variable-size, compressed records suit encoded images, which these are not.
"""

import dataclasses
import json
import mmap
import os
import shutil
from typing import Iterable, Optional

import numpy as np
import tensorflow as tf

from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files

FORMAT = 'raw'
MANIFEST = 'manifest.json'
_IMAGES, _LABELS = 'images.npy', 'labels.npy'
# A mapped store's pages that crops have read count in the process's RSS
# until released; past this many bytes read they are (the page cache keeps
# them), so the RSS does not grow with the store.
RELEASE_EVERY_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Pixels:
  """A split's 256x256 images (resize_size) and labels, by index."""
  images: np.ndarray   # (N, S, S, 3) uint8, in memory or mapped from a store
  labels: np.ndarray   # (N,) int32
  path: Optional[str] = None   # the store's images.npy; None in memory
  mapping: Optional[mmap.mmap] = None   # images' mapping, for a store
  _read_since_release: list[int] = dataclasses.field(
      default_factory=lambda: [0])

  def crops(self, indices: np.ndarray, tops: np.ndarray, lefts: np.ndarray,
            size: int) -> np.ndarray:
    """(B, size, size, 3): image indices[i]'s window at (tops[i], lefts[i]).

    One NumPy gather for the batch, from a view in which every window of
    every image is an element: only the windows' rows are read (a mapped
    store's other pages stay on disk), with no Python per image.
    """
    count, side = self.images.shape[:2]
    image, row, column, channel = self.images.strides
    windows = np.lib.stride_tricks.as_strided(
        self.images,
        (count, side - size + 1, side - size + 1, size, size, 3),
        (image, row, column, row, column, channel), writeable=False)
    found = windows[indices, tops, lefts]
    if self.mapping is not None:
      self._read_since_release[0] += found.nbytes
      if self._read_since_release[0] > RELEASE_EVERY_BYTES:
        self._read_since_release[0] = 0
        self.mapping.madvise(mmap.MADV_DONTNEED)
    return found

  def tf_crops(self, indices: tf.Tensor, tops: tf.Tensor, lefts: tf.Tensor,
               size: int) -> tf.Tensor:
    """crops() as a TensorFlow op, for tf.data."""
    images = tf.numpy_function(
        lambda i, t, l: self.crops(i, t, l, size), [indices, tops, lefts],
        tf.uint8, stateful=False)
    images.set_shape(indices.shape.concatenate([size, size, 3]))
    return images

  def tf_images(self, indices: tf.Tensor) -> tf.Tensor:
    """The whole S x S images of `indices`."""
    zeros = tf.zeros_like(indices, tf.int32)
    return self.tf_crops(indices, zeros, zeros, self.images.shape[1])


def manifest(root: str) -> Optional[dict]:
  """The manifest of a finished store at root; None where root is not a
  store (a 256-px copy's manifest has no format)."""
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      found = json.load(f)
    if not isinstance(found, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise errors.DatasetError(f'{path} is damaged ({e}): prepare the dataset '
                              f'again into an empty folder') from e
  if found.get('format') != FORMAT:
    return None
  if not all(key in found for key in ('classes', 'resize_size', 'images')):
    raise errors.DatasetError(f'{path} is damaged (it lacks classes, '
                              f'resize_size or images): prepare the store '
                              f'again into an empty folder')
  return found


def _layout(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, offset of the data) from a .npy file's header."""
  with open(path, 'rb') as f:
    if np.lib.format.read_magic(f) != (1, 0):   # as create() writes it
      raise ValueError('not a version 1.0 .npy header')
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    if fortran:
      raise ValueError('Fortran order')
    return shape, dtype, f.tell()


def _mapped(path: str, shape: tuple[int, ...],
            dtype) -> tuple[np.ndarray, mmap.mmap]:
  """The array of a store file, mapped, after checking its header and its
  size, so a truncated or foreign file is one line that names it."""
  damaged = (f'the raw store file {path} is damaged ({{}}): prepare the '
             f'store again into an empty folder')
  try:
    found, found_dtype, offset = _layout(path)
  except FileNotFoundError as e:
    raise errors.DatasetError(damaged.format('missing')) from e
  except (OSError, ValueError, SyntaxError) as e:
    raise errors.DatasetError(damaged.format(f'no array header: {e}')) from e
  if tuple(found) != tuple(shape) or found_dtype != np.dtype(dtype):
    raise errors.DatasetError(damaged.format(
        f'holds {found_dtype} {tuple(found)}, its manifest says '
        f'{np.dtype(dtype)} {tuple(shape)}'))
  size = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
  on_disk = os.path.getsize(path)
  if on_disk != size:
    raise errors.DatasetError(damaged.format(
        f'{on_disk:,} bytes where it should have {size:,}; truncated?'))
  with open(path, 'rb') as f:
    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return np.frombuffer(mapping, dtype, int(np.prod(shape)), offset).reshape(
      shape), mapping


def open_split(root: str, split: str, resize_size: int) -> Pixels:
  """A finished store's split, memory-mapped."""
  found = manifest(root)
  side = found['resize_size']
  if side != resize_size:
    raise errors.DatasetError(
        f'the raw store {root} holds {side}x{side} images but resize_size is '
        f'{resize_size}: set --config.resize_size={side}, or prepare a store '
        f'at {resize_size}')
  count = found['images'].get(split)
  if count is None:
    raise errors.DatasetError(
        f'the raw store {root} has no split {split!r}: use one of '
        f'{", ".join(found["images"])}')
  path = os.path.join(root, split, _IMAGES)
  images, mapping = _mapped(path, (count, side, side, 3), np.uint8)
  labels, _ = _mapped(os.path.join(root, split, _LABELS), (count,), np.int32)
  return Pixels(images, labels, path, mapping)


def nbytes(counts: dict[str, int], side: int) -> int:
  """The size of a store of counts[split] images per split."""
  return sum(count * (side * side * 3 + 4) for count in counts.values())


def size_text(count: int) -> str:
  """'252.2 GB', or '2 MB' below a gigabyte."""
  return (f'{count / 1e9:.1f} GB' if count >= 1e9
          else f'{count / 1e6:.0f} MB')


def check_room(root: str, counts: dict[str, int], side: int) -> None:
  """Refuse a store that its disk cannot hold, before writing it: the files
  are sparse until written, so count only what they already take."""
  taken = 0
  for split in counts:
    for name in (_IMAGES, _LABELS):
      path = os.path.join(root, split, name)
      if os.path.exists(path):
        taken += os.stat(path).st_blocks * 512
  needed = nbytes(counts, side) - taken
  existing = root
  while not os.path.exists(existing):
    existing = os.path.dirname(os.path.abspath(existing))
  free = shutil.disk_usage(existing).free
  if needed > free:
    raise errors.DatasetError(
        f'the raw store needs {size_text(needed)} more in {root} and its '
        f'disk has {size_text(free)} free: free some space, or give a '
        f'--workdir on a larger disk')


def create(root: str, counts: dict[str, int], side: int) -> None:
  """The store's files at their full size (sparse), where a killed prepare
  has not made them already. Process 0 only."""
  for split, count in counts.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for name, shape, dtype in ((_IMAGES, (count, side, side, 3), np.uint8),
                               (_LABELS, (count,), np.int32)):
      path = os.path.join(root, split, name)
      if not os.path.exists(path):
        with files.atomic_write(path, 'wb') as f:
          np.lib.format.write_array_header_1_0(f, {
              'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
              'fortran_order': False, 'shape': shape})
          f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def _progress_file(root: str, split: str, processes: int, process: int) -> str:
  return os.path.join(root, split, f'written.{processes}-{process}')


def rows_written(root: str, split: str, processes: int, process: int) -> int:
  """How many of its rows this process wrote before it was stopped."""
  try:
    with open(_progress_file(root, split, processes, process)) as f:
      return int(f.read())
  except FileNotFoundError:
    return 0


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
  view = memoryview(np.ascontiguousarray(data)).cast('B')
  while view:
    written = os.pwrite(fd, view, offset)
    view, offset = view[written:], offset + written


def write_rows(root: str, split: str, first_row: int, done: int,
               batches: Iterable[tuple[np.ndarray, np.ndarray]],
               processes: int, process: int) -> Iterable[int]:
  """Write (images, labels) batches at rows first_row + done on, each on
  disk (fdatasync) before the progress file counts it, so a killed
  prepare goes on from the last batch it finished. Yields each batch's
  size as it is written."""
  images_path = os.path.join(root, split, _IMAGES)
  labels_path = os.path.join(root, split, _LABELS)
  image_offset, label_offset = _layout(images_path)[2], _layout(labels_path)[2]
  with open(images_path, 'r+b') as images_file, \
       open(labels_path, 'r+b') as labels_file:
    for images, labels in batches:
      row = first_row + done
      _pwrite(images_file.fileno(), images, image_offset + row * images[0].nbytes)
      _pwrite(labels_file.fileno(), labels.astype(np.int32), label_offset + row * 4)
      os.fdatasync(images_file.fileno())
      os.fdatasync(labels_file.fileno())
      done += len(images)
      with files.atomic_write(_progress_file(root, split, processes, process)) as f:
        f.write(str(done))
      yield len(images)


def finish(root: str, contents: dict) -> None:
  """Mark the store complete: its manifest, written last. Process 0 only,
  once every process has written its rows."""
  for split in contents['images']:
    for name in os.listdir(os.path.join(root, split)):
      if name.startswith('written.'):
        os.remove(os.path.join(root, split, name))
  with files.atomic_write(os.path.join(root, MANIFEST)) as f:
    json.dump({'format': FORMAT, **contents}, f)
