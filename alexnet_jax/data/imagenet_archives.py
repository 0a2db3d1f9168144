"""ImageNet's two archives read directly, as TFDS's imagenet2012 reads them.

--mode=prepare writes its 256-px copy from here when the archives are at
hand and TFDS has not built imagenet2012: one pass over the tars instead of
TFDS's pass (which writes every JPEG again as TFRecords, from one Python
generator) followed by prepare's own. The labels are TFDS's (its class
order and its validation labels file), and ImageNet's CMYK and PNG files go
through TFDS's own conversions, so the copy holds the same images in the
same class folders as a copy made through TFDS.

Each process takes every process_count-th inner tar of the train archive
and every process_count-th image of the validation archive.
"""

import io
import os
import tarfile
from typing import Iterator, Optional

import jax
import tensorflow as tf

from alexnet_jax.runtime import errors

TRAIN_ARCHIVE = 'ILSVRC2012_img_train.tar'
VAL_ARCHIVE = 'ILSVRC2012_img_val.tar'
# The TFDS split each archive is.
SPLITS = {'train': TRAIN_ARCHIVE, 'validation': VAL_ARCHIVE}
_CHUNK = 64


def manual_folder(config, data_dir_root: str) -> str:
  """Where the archives are looked for: dataset.manual_dir, else TFDS's own
  default, <data_dir>/downloads/manual."""
  return config.dataset.manual_dir or os.path.join(data_dir_root, 'downloads',
                                                   'manual')


def check_archive(path: str) -> list[tarfile.TarInfo]:
  """Read every member header of a tar, so a damaged or truncated one is
  named before an hour is spent on it. Returns the headers."""
  try:
    with tarfile.open(path) as archive:
      members = archive.getmembers()
      if not members:
        raise tarfile.ReadError('it holds no files')
      return members
  except (tarfile.TarError, EOFError, OSError) as e:
    reason = ('not a tar archive' if 'could not be opened' in str(e)
              else str(e))
    raise errors.DatasetError(f'{path} is damaged ({reason}): download it '
                              f'again') from e


def check_folder(config, manual: str) -> None:
  """Both archives are in `manual` (manual_folder) and read whole."""
  for name in SPLITS.values():
    if not os.path.exists(os.path.join(manual, name)):
      if config.dataset.manual_dir:
        raise errors.DatasetError(
            f'ImageNet is not prepared and {name} is not in {manual}: '
            f'download it from image-net.org, or set '
            f'--config.dataset.manual_dir to the folder that holds it')
      raise errors.DatasetError(
          f'ImageNet is not prepared and {name} is in neither '
          f'dataset.manual_dir (not set) nor {manual}: download the archives '
          f'from image-net.org and put them in one of the two (set '
          f'--config.dataset.manual_dir=FOLDER)')
  for name in SPLITS.values():
    check_archive(os.path.join(manual, name))


def write_archives(folder: str, train: dict[str, list[tuple[str, bytes]]],
                   validation: list[tuple[str, bytes]]) -> str:
  """The two archives in image-net.org's layout, for benchmarks and tests:
  the train tar holds one tar per class (WNID.tar of WNID_N.JPEG files),
  the validation tar the ILSVRC2012_val_%08d.JPEG files. `train` maps each
  class to its (file name, bytes)."""
  os.makedirs(folder, exist_ok=True)

  def add(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))

  with tarfile.open(os.path.join(folder, TRAIN_ARCHIVE), 'w') as archive:
    for wnid, files in train.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as images_of_class:
        for name, data in files:
          add(images_of_class, name, data)
      add(archive, f'{wnid}.tar', inner.getvalue())
  with tarfile.open(os.path.join(folder, VAL_ARCHIVE), 'w') as archive:
    for name, data in validation:
      add(archive, name, data)
  return folder


def _tfds_imagenet():
  """TFDS's imagenet2012 builder module and its shared helpers."""
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import (
      imagenet2012_dataset_builder as builder)
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  return builder, imagenet_common


def folder(config) -> Optional[str]:
  """The folder holding both archives, when the copy should come straight
  from them: dataset.name imagenet2012 with its train and validation
  splits, TFDS's imagenet2012 not built yet (a built one is read through
  TFDS), and the archives in dataset.manual_dir or TFDS's default manual
  folder, <data_dir>/downloads/manual."""
  if (config.dataset.name != 'imagenet2012'
      or {config.dataset.train_split, config.dataset.eval_split} != set(
          SPLITS)):
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=config.dataset.data_dir)
  if builder.is_prepared():
    return None
  manual = manual_folder(config, builder.data_dir_root)
  if all(os.path.exists(os.path.join(manual, name))
         for name in SPLITS.values()):
    return manual
  return None


def class_names() -> tuple[str, ...]:
  """TFDS's imagenet2012 class order: the WordNet ids of labels.txt."""
  _, common = _tfds_imagenet()
  with open(common.label_names_file()) as f:
    return tuple(f.read().split())


def _fixed(name: str, data: bytes) -> bytes:
  """TFDS's conversions of the CMYK and PNG files it lists, by name."""
  builder, _ = _tfds_imagenet()
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import image_utils
  if name in builder.CMYK_IMAGES:
    return image_utils.jpeg_cmyk_to_rgb(data)
  if name in builder.PNG_IMAGES:
    return image_utils.png_to_jpeg(data)
  return data


def images(manual: str, split: str) -> Iterator[tuple[str, str, bytes, float]]:
  """This process's share of a split: (class name, file stem, JPEG bytes,
  share of the archive's bytes it stands for), in archive order."""
  path = os.path.join(manual, SPLITS[split])
  processes, index = jax.process_count(), jax.process_index()
  if split == 'validation':
    _, common = _tfds_imagenet()
    labels = common.get_validation_labels(path)
  with tarfile.open(path, 'r:') as archive:
    for position, member in enumerate(archive):
      if position % processes != index or not member.isfile():
        continue
      data = archive.extractfile(member).read()
      stem = os.path.splitext(member.name)[0]
      if split == 'validation':
        yield labels[member.name], stem, _fixed(member.name, data), float(
            member.size)
        continue
      # A train member is one class's tar, read whole as TFDS reads it.
      with tarfile.open(fileobj=io.BytesIO(data), mode='r:') as inner:
        files = [m for m in inner.getmembers() if m.isfile()]
        for image in files:  # (an empty class tar yields nothing)
          yield (stem, os.path.splitext(image.name)[0],
                 _fixed(image.name, inner.extractfile(image).read()),
                 member.size / len(files))


def share_bytes(members: list[tarfile.TarInfo]) -> int:
  """The bytes of this process's share of an archive, from its headers."""
  processes, index = jax.process_count(), jax.process_index()
  return sum(m.size for position, m in enumerate(members)
             if position % processes == index and m.isfile())


def share_count(path: str, split: str,
                members: list[tarfile.TarInfo]) -> int:
  """How many images this process's share of an archive holds (as images()
  gives them), from headers alone: a train member is a class tar, whose
  own headers are read with its images skipped over."""
  processes, index = jax.process_count(), jax.process_index()
  share = [m for position, m in enumerate(members)
           if position % processes == index and m.isfile()]
  if split == 'validation':
    return len(share)
  count = 0
  with open(path, 'rb') as f:
    for member in share:
      f.seek(member.offset_data)
      with tarfile.TarFile(fileobj=f) as inner:  # reads on from here
        count += sum(1 for image in inner if image.isfile())
  return count


class Reading:
  """What a dataset() read: the paths it gave out, and the error that
  stopped it early (a damaged archive), which tf.data's ignore_errors would
  otherwise swallow."""

  def __init__(self):
    self.given: list[str] = []
    self.error: Optional[Exception] = None


def dataset(manual: str, split: str,
            done) -> tuple[tf.data.Dataset, Reading]:
  """images() as (relative path 'CLASS/STEM.jpeg', JPEG bytes, work), for
  the paths `done(path)` does not call finished. Work is the archive bytes
  an image stands for, with those of the finished images before it.

  The generator hands over lists of _CHUNK images: one element at a time,
  tf.data's generator costs about a millisecond each, which would cap a
  process at about 1,000 images/sec whatever its cores."""
  reading = Reading()

  def unfinished():
    carried, chunk = 0.0, []
    try:
      for class_name, stem, data, work in images(manual, split):
        relative = f'{class_name}/{stem}.jpeg'
        carried += work
        if done(relative):
          continue
        reading.given.append(relative)
        chunk.append((relative, data, carried))
        carried = 0.0
        if len(chunk) == _CHUNK:
          yield tuple(zip(*chunk))
          chunk = []
    except Exception as e:  # pylint: disable=broad-except
      reading.error = e
    if chunk:
      yield tuple(zip(*chunk))

  return tf.data.Dataset.from_generator(unfinished, output_signature=(
      tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.string),
      tf.TensorSpec((None,), tf.float64))).unbatch(), reading
