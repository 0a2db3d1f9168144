"""Small ImageNet archives in the layout of image-net.org's, for tests."""

import io

import numpy as np
from PIL import Image

from alexnet_jax.data import imagenet_archives

# The first classes of TFDS's imagenet2012 label order.
CLASSES = ('n01440764', 'n01443537', 'n01484850')


def _jpeg(rng: np.random.Generator) -> bytes:
  pixels = rng.integers(0, 256, (int(rng.integers(60, 90)),
                                 int(rng.integers(60, 90)), 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


# Two of the files TFDS converts, by name: a CMYK JPEG and a PNG named .JPEG.
CMYK_FILE, PNG_FILE = 'n01739381_1309.JPEG', 'n02105855_2933.JPEG'


def _odd_file(name: str, rng: np.random.Generator) -> bytes:
  """The file ImageNet has under that name's kind: CMYK JPEG or PNG."""
  image = Image.fromarray(rng.integers(0, 256, (70, 80, 3), np.uint8))
  buffer = io.BytesIO()
  if name == CMYK_FILE:
    image.convert('CMYK').save(buffer, format='JPEG', quality=90)
  else:
    image.save(buffer, format='PNG')
  return buffer.getvalue()


def write(folder: str, train_per_class: int = 4, val_images: int = 6,
          seed: int = 0, odd_files: bool = False) -> str:
  """ILSVRC2012_img_train.tar (one inner tar per class) and
  ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG) in folder. With
  odd_files, two more classes hold one CMYK and one PNG file each."""
  rng = np.random.default_rng(seed)
  classes = {wnid: [(f'{wnid}_{i}.JPEG', _jpeg(rng))
                    for i in range(train_per_class)] for wnid in CLASSES}
  if odd_files:
    for name in (CMYK_FILE, PNG_FILE):
      classes[name.split('_')[0]] = [(name, _odd_file(name, rng))]
  validation = [(f'ILSVRC2012_val_{i:08d}.JPEG', _jpeg(rng))
                for i in range(1, val_images + 1)]
  # Not in name order, as TFDS's validation labels must not assume.
  return imagenet_archives.write_archives(folder, classes, validation[::-1])
