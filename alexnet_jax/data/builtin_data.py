"""The built-in dataset: JPEG photos of ten kinds of shape, made from a seed.

It exists so that a newcomer can train and evaluate without downloading
anything, through the same file-reading path as a folder of real photos.
Each image has its own size and aspect ratio, a cluttered, noisy background,
and one shape of a random colour, size, position and rotation; the class is
the kind of shape, never its colour, so the network has to learn form.
"""

import concurrent.futures
import concurrent.futures.process
import fcntl
import glob
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import threading

import numpy as np
from PIL import Image
from PIL import ImageDraw

from alexnet_jax import config as config_lib
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files
from alexnet_jax.runtime import interrupts

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


def _write_class(folder: str, kind: str, count: int,
                 seed: tuple[int, int, int]) -> None:
  """`count` images of `kind` in `folder`, 00000.jpg on, from their own
  random generator, so the files do not depend on the order of the work."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  for i in range(count):
    with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
      f.write(_encode(render(kind, rng), rng))


def _end_on_interrupt() -> None:
  """A worker's Ctrl-C ends it at once; as a KeyboardInterrupt it would only
  fail the image at hand and go on to the next class."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _manifest(seed: int, per_class: dict[str, int]) -> dict:
  return {'version': VERSION, 'seed': seed, 'classes': list(CLASSES),
          'per_class': per_class}


def settings(config) -> tuple[str, int, dict[str, int]]:
  """ensure()'s arguments for config's built-in dataset: where it is kept,
  its seed and its images per class of each split."""
  per_class = {'train': config.dataset.builtin_train_per_class,
               'validation': config.dataset.builtin_eval_per_class}
  directory = os.path.join(
      config_lib.cache_root(config), f'builtin_v{VERSION}_seed{config.seed}'
      f'_{per_class["train"]}_{per_class["validation"]}')
  return directory, config.seed, per_class


# Datasets being made in the background (start()), by ensure()'s arguments.
_started: dict[tuple, concurrent.futures.Future] = {}


def _key(directory: str, seed: int, per_class: dict[str, int]) -> tuple:
  return directory, seed, tuple(sorted(per_class.items()))


def start(directory: str, seed: int, per_class: dict[str, int]) -> None:
  """Begin ensure() in the background; ensure() then waits for it.

  Why: the images are drawn in processes of their own, so a training run
  that starts this before it loads TensorFlow and JAX (single-threaded and
  slow: about 20 s on the first run of a fresh install) has the dataset
  made meanwhile. A program that exits before ensure() (an error in
  between) first waits for the drawing to end.
  """
  key = _key(directory, seed, per_class)
  if key in _started:
    return
  future = concurrent.futures.Future()

  def make():
    try:
      future.set_result(_make(directory, seed, per_class))
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)   # raised by ensure()

  _started[key] = future
  threading.Thread(target=make, daemon=True).start()


def ensure(directory: str, seed: int, per_class: dict[str, int]) -> str:
  """Generate the dataset in `directory` unless it is already there.

  per_class: images per class for each split, e.g. {'train': 600,
  'validation': 100}. Writes directory/SPLIT/CLASS/NNNNN.jpg. Returns the
  directory.
  """
  started = _started.pop(_key(directory, seed, per_class), None)
  try:
    if started is not None:
      return started.result()
    return _make(directory, seed, per_class)
  except concurrent.futures.process.BrokenProcessPool:
    interrupts.raise_if_seen()  # Ctrl-C, which ended the workers too
    raise


def _make(directory: str, seed: int, per_class: dict[str, int]) -> str:
  """ensure()'s work. Generation goes to a temporary folder renamed at the
  end, so an interrupted run never leaves a half-made dataset that looks
  complete."""
  manifest = _manifest(seed, per_class)
  if _made_with(directory, manifest):
    return directory
  _remove_abandoned(directory)
  partial, lock = _locked_partial(directory)
  try:
    _write(partial, seed, per_class)
    with open(os.path.join(partial, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)
    try:
      os.rename(partial, directory)
    except OSError:
      shutil.rmtree(partial)
      if not _made_with(directory, manifest):
        raise
  finally:
    os.close(lock)
  return directory


def _write(partial: str, seed: int, per_class: dict[str, int]) -> None:
  """Every class folder of every split in `partial`; on a failure, nothing.

  A class folder a process: drawing holds Python's lock, so threads of
  this process would neither use the cores fully nor run beside its
  imports. Spawned, not forked: forking a process that runs TensorFlow's
  threads is unsafe.
  """
  folders = [(os.path.join(partial, split, kind), kind, count,
              (seed, split_index, label))
             for split_index, (split, count) in enumerate(
                 sorted(per_class.items()))
             for label, kind in enumerate(CLASSES)]
  with concurrent.futures.ProcessPoolExecutor(
      len(os.sched_getaffinity(0)),
      mp_context=multiprocessing.get_context('spawn'),
      initializer=_end_on_interrupt) as pool:
    try:
      list(pool.map(_write_class, *zip(*folders)))
    except BaseException:  # Ctrl-C reaches the workers too: stop at once
      # The folders not begun are dropped; those being written end first
      # (at once on Ctrl-C), so nothing writes into the partial copy after
      # it is removed.
      pool.shutdown(cancel_futures=True)
      shutil.rmtree(partial, ignore_errors=True)
      raise


def _locked_partial(directory: str) -> tuple[str, int]:
  """A new folder for this process to make the dataset in, and the open
  descriptor that holds its lock until the process ends.

  Several processes of one job may make the dataset at once, on one host
  or several sharing the folder: each writes its own copy, and the first to
  finish moves it into place. The lock tells _remove_abandoned which copies
  are still being written.
  """
  partial = (f'{directory.rstrip("/")}.partial-{socket.gethostname()}'
             f'-{os.getpid()}')
  while True:
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
      lock = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
      continue  # another process removed it before it was locked: again
    fcntl.flock(lock, fcntl.LOCK_EX)
    if files.still_at(partial, lock):
      return partial, lock
    os.close(lock)  # another process removed it meanwhile: make it again


def _remove_abandoned(directory: str) -> None:
  """Remove the copies of processes that ended before finishing theirs
  (killed, or interrupted before their clean-up ran): no process holds
  their lock."""
  for partial in glob.glob(glob.escape(directory.rstrip('/')) + '.partial-*'):
    try:
      lock = os.open(partial, os.O_RDONLY)
    except OSError:
      continue  # moved into place or removed meanwhile
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      shutil.rmtree(partial, ignore_errors=True)
    except OSError:
      pass  # still being written
    finally:
      os.close(lock)


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
