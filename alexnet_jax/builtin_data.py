"""The built-in dataset: JPEG photos of ten kinds of shape, made from a seed.

It exists so that a newcomer can train and evaluate without downloading
anything, through the same file-reading path as a folder of real photos.
Each image has its own size and aspect ratio, a cluttered, noisy background,
and one shape of a random colour, size, position and rotation; the class is
the kind of shape, never its colour, so the network has to learn form.
"""

import concurrent.futures
import io
import json
import math
import os
import shutil

import numpy as np
from PIL import Image
from PIL import ImageDraw

from alexnet_jax import errors

VERSION = 2
CLASSES = ('circle', 'triangle', 'square', 'pentagon', 'star', 'plus',
           'ring', 'crescent', 'arrow', 'heart')


def _polygon(n: int, radius: float, rotation: float, inner: float = 1.0):
  """Vertices of a regular n-gon (or a star when inner < 1) around 0."""
  points = []
  corners = n * (2 if inner < 1.0 else 1)
  for i in range(corners):
    r = radius * (inner if inner < 1.0 and i % 2 else 1.0)
    a = rotation + 2 * math.pi * i / corners
    points.append((r * math.cos(a), r * math.sin(a)))
  return points


def _rotate(points, rotation: float):
  c, s = math.cos(rotation), math.sin(rotation)
  return [(x * c - y * s, x * s + y * c) for x, y in points]


def _outline(kind: str, r: float, rot: float):
  """The shape as polygons to fill: (points, filled) pairs around 0."""
  if kind == 'triangle':
    return [(_polygon(3, r, rot), True)]
  if kind == 'square':
    return [(_polygon(4, r, rot), True)]
  if kind == 'pentagon':
    return [(_polygon(5, r, rot), True)]
  if kind == 'star':
    return [(_polygon(5, r, rot, inner=0.42), True)]
  if kind == 'plus':
    w = r * 0.33
    arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r),
           (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    return [(_rotate(arm, rot), True)]
  if kind == 'arrow':
    w = r * 0.25
    arrow = [(-r, -w), (0.1 * r, -w), (0.1 * r, -2.4 * w), (r, 0),
             (0.1 * r, 2.4 * w), (0.1 * r, w), (-r, w)]
    return [(_rotate(arrow, rot), True)]
  if kind == 'heart':
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) -
          np.cos(4 * t))
    pts = [(float(a) * r / 17, float(b) * r / 17) for a, b in zip(x, y)]
    return [(_rotate(pts, rot), True)]
  if kind == 'circle':
    return [(_polygon(40, r, rot), True)]
  if kind == 'ring':
    return [(_polygon(40, r, rot), True), (_polygon(40, 0.55 * r, rot), False)]
  if kind == 'crescent':
    off = _rotate([(0.45 * r, 0)], rot)[0]
    inner = [(x + off[0], y + off[1]) for x, y in _polygon(40, 0.85 * r, 0)]
    return [(_polygon(40, r, rot), True), (inner, False)]
  raise ValueError(kind)


def render(kind: str, rng: np.random.Generator) -> Image.Image:
  """One image of `kind`: random size, aspect, background, colour and pose."""
  short = int(rng.integers(80, 161))
  aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 3 / 4, 2 / 3]))
  width, height = ((round(short * aspect), short) if aspect >= 1
                   else (short, round(short / aspect)))
  # Background: a colour gradient, sensor noise and a few distractor strokes.
  c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
  ramp = np.linspace(0, 1, width)[None, :, None]
  if rng.random() < 0.5:
    ramp = np.linspace(0, 1, height)[:, None, None]
  background = c0 + (c1 - c0) * ramp + rng.normal(0, 12, (height, width, 3))
  background = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
  image = background.copy()
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 6))):
    xy = [tuple(rng.uniform(0, [width, height])) for _ in range(2)]
    draw.line(xy, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)),
              width=int(rng.integers(1, 4)))
  # The shape, in a colour that differs clearly from the background, inside
  # the centre square that the paper's preprocessing keeps.
  r = rng.uniform(0.22, 0.42) * short
  cx = rng.uniform((width - short) / 2 + r, (width + short) / 2 - r)
  cy = rng.uniform((height - short) / 2 + r, (height + short) / 2 - r)
  bg_here = np.asarray(image)[int(cy), int(cx)].astype(float)
  colour = rng.uniform(0, 255, 3)
  while np.abs(colour - bg_here).sum() < 180:
    colour = rng.uniform(0, 255, 3)
  for points, filled in _outline(kind, r, rng.uniform(0, 2 * math.pi)):
    xy = [(cx + x, cy + y) for x, y in points]
    if filled:
      draw.polygon(xy, fill=tuple(int(v) for v in colour))
    else:  # a hole shows the background again (ring, crescent)
      mask = Image.new('L', image.size, 0)
      ImageDraw.Draw(mask).polygon(xy, fill=255)
      image.paste(background, mask=mask)
  return image


def _encode(image: Image.Image, rng: np.random.Generator) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=int(rng.integers(70, 96)))
  return buffer.getvalue()


def _write_class(folder: str, count: int, rng: np.random.Generator) -> None:
  """`count` images of the class named by the folder, 00000.jpg on."""
  kind = os.path.basename(folder)
  os.makedirs(folder)
  for i in range(count):
    with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
      f.write(_encode(render(kind, rng), rng))


def _manifest(seed: int, per_class: dict[str, int]) -> dict:
  return {'version': VERSION, 'seed': seed, 'classes': list(CLASSES),
          'per_class': per_class}


def ensure(directory: str, seed: int, per_class: dict[str, int]) -> str:
  """Generate the dataset in `directory` unless it is already there.

  per_class: images per class for each split, e.g. {'train': 600,
  'validation': 100}. Writes directory/SPLIT/CLASS/NNNNN.jpg. Generation
  goes to a temporary folder renamed at the end, so an interrupted run never
  leaves a half-made dataset that looks complete. Returns the directory.
  """
  manifest = _manifest(seed, per_class)
  if _made_with(directory, manifest):
    return directory
  # Several processes of one job may get here at once: each writes its own
  # copy, and the first to finish moves it into place.
  partial = f'{directory.rstrip("/")}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  folders = [(os.path.join(partial, split, kind), count,
              np.random.default_rng([seed, split_index, label]))
             for split_index, (split, count) in enumerate(
                 sorted(per_class.items()))
             for label, kind in enumerate(CLASSES)]
  # A class folder a thread: drawing and JPEG encoding release the GIL
  # enough that on 2 cores the quickstart's 7,000 images took 13 s against
  # 20-24 s in one thread. Each folder has its own generator, so the files
  # are the same either way.
  threads = len(os.sched_getaffinity(0))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(lambda folder: _write_class(*folder), folders))
  with open(os.path.join(partial, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  try:
    os.rename(partial, directory)
  except OSError:
    shutil.rmtree(partial)
    if not _made_with(directory, manifest):
      raise
  return directory


def _made_with(directory: str, manifest: dict) -> bool:
  """Whether directory holds the dataset of `manifest` (False: none there)."""
  manifest_path = os.path.join(directory, 'manifest.json')
  if not os.path.exists(manifest_path):
    return False
  with open(manifest_path) as f:
    if json.load(f) == manifest:
      return True
  raise errors.UserError(
      f'{directory} holds a built-in dataset made with other settings; '
      f'delete it or set --config.dataset.data_dir to another folder')
