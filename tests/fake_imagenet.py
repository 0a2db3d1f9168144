"""Small ImageNet archives in the layout of image-net.org's, for tests."""

import io
import os
import tarfile

import numpy as np
from PIL import Image

# The first classes of TFDS's imagenet2012 label order.
CLASSES = ('n01440764', 'n01443537', 'n01484850')


def _jpeg(rng: np.random.Generator) -> bytes:
  pixels = rng.integers(0, 256, (int(rng.integers(60, 90)),
                                 int(rng.integers(60, 90)), 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def write(folder: str, train_per_class: int = 4, val_images: int = 6,
          seed: int = 0) -> str:
  """ILSVRC2012_img_train.tar (one inner tar per class) and
  ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG) in folder."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_train.tar'),
                    'w') as train:
    for wnid in CLASSES:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as images:
        for i in range(train_per_class):
          _add(images, f'{wnid}_{i}.JPEG', _jpeg(rng))
      _add(train, f'{wnid}.tar', inner.getvalue())
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_val.tar'),
                    'w') as val:
    for i in range(1, val_images + 1):
      _add(val, f'ILSVRC2012_val_{i:08d}.JPEG', _jpeg(rng))
  return folder
