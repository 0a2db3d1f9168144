"""--mode=figures: the paper's Figures 3 and 4 from a checkpoint, as PNGs.

In WORKDIR/figures/:
  conv1_kernels.png  Figure 3: every conv1 kernel, tower by tower (in 2012
                     one tower learned colour-agnostic kernels, the other
                     colour-specific ones), each scaled to the full range.
  predictions.png    Figure 4, left: evaluation images, their class, and the
                     network's top 5 (the true class's bar in red).
  neighbours.png     Figure 4, right: evaluation images (first column) and
                     the training images nearest to them in fc7 space.
  figures.json       the numbers behind the last two.
The drawing functions also feed TensorBoard during training (trainer.py).
"""

import json
import math
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.model import alexnet
from alexnet_jax.runtime import xla_cpu
from alexnet_jax.tools import inference

KERNEL_ZOOM = 4        # screen pixels per kernel pixel
KERNEL_GAP = 2         # between kernels
TOWER_GAP = 8          # between the towers' blocks
KERNELS_PER_ROW = 16
TILE = 128             # an image's side in the panels
BAR_HEIGHT = 14
NUMBER_WIDTH = 34      # right of a bar: its probability
HEADER = 18            # a figure's title strip
LABEL_WIDTH = 56       # left of the conv1 grid: the tower's name
QUERY_GAP = 16         # between the queries and their neighbours
PREDICTION_IMAGES = 8  # the paper shows 8
QUERIES = 5            # and 5 queries with 6 neighbours each
NEIGHBOURS = 6
_TRUE, _OTHER, _TEXT = (200, 30, 30), (70, 110, 190), (0, 0, 0)


def kernel_cell(tower: int, index: int, kernel_size: int,
                per_tower: int) -> tuple[int, int]:
  """(top, left) of kernel `index` of `tower` in the conv1 grid."""
  cell = kernel_size * KERNEL_ZOOM + KERNEL_GAP
  rows_per_tower = math.ceil(per_tower / KERNELS_PER_ROW)
  row, column = divmod(index, KERNELS_PER_ROW)
  top = KERNEL_GAP + tower * (rows_per_tower * cell + TOWER_GAP) + row * cell
  return top, KERNEL_GAP + column * cell


def kernel_pixels(kernel: np.ndarray) -> np.ndarray:
  """One (k, k, 3) kernel as uint8, its own minimum 0 and maximum 255."""
  low, high = float(kernel.min()), float(kernel.max())
  scaled = (kernel - low) / max(high - low, 1e-12)
  return np.round(scaled * 255).astype(np.uint8)


def conv1_grid(kernels: np.ndarray) -> np.ndarray:
  """conv1's kernels, (towers, k, k, 3, per tower), as one uint8 image."""
  towers, k, _, _, per_tower = kernels.shape
  bottom, _ = kernel_cell(towers - 1, per_tower - 1, k, per_tower)
  _, right = kernel_cell(0, min(per_tower, KERNELS_PER_ROW) - 1, k, per_tower)
  side = k * KERNEL_ZOOM
  grid = np.full((bottom + side + KERNEL_GAP, right + side + KERNEL_GAP, 3),
                 255, np.uint8)
  for tower in range(towers):
    for index in range(per_tower):
      top, left = kernel_cell(tower, index, k, per_tower)
      zoomed = np.kron(kernel_pixels(kernels[tower, ..., index]),
                       np.ones((KERNEL_ZOOM, KERNEL_ZOOM, 1), np.uint8))
      grid[top:top + side, left:left + side] = zoomed
  return grid


def with_title(image: np.ndarray, title: str,
               labels: tuple[tuple[int, str], ...] = ()) -> np.ndarray:
  """image under a title strip (HEADER high), with a LABEL_WIDTH margin on
  its left holding each (row, text) of `labels` where there are any."""
  left = LABEL_WIDTH if labels else 0
  h, w, _ = image.shape
  out = Image.new('RGB', (left + w, HEADER + h), 'white')
  out.paste(Image.fromarray(image), (left, HEADER))
  draw = ImageDraw.Draw(out)
  draw.text((4, 3), title, fill=_TEXT)
  for row, text in labels:
    draw.text((4, HEADER + row), text, fill=_TEXT)
  return np.asarray(out)


def conv1_figure(kernels: np.ndarray, step: int) -> np.ndarray:
  """Figure 3: conv1_grid under its title, each tower's block labelled."""
  towers, k, _, _, per_tower = kernels.shape
  labels = tuple((kernel_cell(t, 0, k, per_tower)[0], f'tower {t}')
                 for t in range(towers))
  return with_title(conv1_grid(kernels),
                    f'conv1 kernels at step {step}, {per_tower} per tower',
                    labels)


def _tile(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BILINEAR)


def prediction_panel(image: np.ndarray, true_name: str,
                     top5: list[list]) -> np.ndarray:
  """An image, its class, and five bars as long as the top-5 probabilities,
  each with its probability to its right."""
  panel = Image.new('RGB', (TILE + NUMBER_WIDTH,
                            TILE + 16 + 5 * BAR_HEIGHT), 'white')
  panel.paste(_tile(image), (0, 0))
  draw = ImageDraw.Draw(panel)
  draw.text((2, TILE + 2), true_name, fill=_TEXT)
  for rank, (name, probability) in enumerate(top5):
    top = TILE + 16 + rank * BAR_HEIGHT
    colour = _TRUE if name == true_name else _OTHER
    draw.rectangle((0, top + 1, round(probability * (TILE - 1)),
                    top + BAR_HEIGHT - 2), fill=colour)
    draw.text((2, top + 1), name, fill=_TEXT)
    draw.text((TILE + 3, top + 1), f'{probability:.2f}', fill=_TEXT)
  return np.asarray(panel)


def grid(images: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
  """Equal-sized images in rows of `columns`, on white."""
  h, w, _ = images[0].shape
  rows = math.ceil(len(images) / columns)
  out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255,
                np.uint8)
  for i, image in enumerate(images):
    row, column = divmod(i, columns)
    out[gap + row * (h + gap):gap + row * (h + gap) + h,
        gap + column * (w + gap):gap + column * (w + gap) + w] = image
  return out


def nearest(queries: np.ndarray, pool: np.ndarray,
            count: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices into `pool` of each query's `count` nearest rows (Euclidean,
  every pair compared), and their distances."""
  queries, pool = queries.astype(np.float64), pool.astype(np.float64)
  squared = (np.sum(queries ** 2, axis=1)[:, None]
             - 2 * queries @ pool.T + np.sum(pool ** 2, axis=1)[None, :])
  order = np.argsort(squared, axis=1, kind='stable')[:, :count]
  distances = np.sqrt(np.maximum(np.take_along_axis(squared, order, 1), 0))
  return order, distances


def save_png(image: np.ndarray, path: str) -> None:
  Image.fromarray(image).save(path)


def _spread_sample(src: sources.Source, count: int) -> tf.data.Dataset:
  """About `count` examples of this process's share, as (bytes, label, index).

  With random access they are spread evenly over the split (a folder is in
  class order, so its first examples would be one class); otherwise they are
  the first ones, which in TFDS's shuffled records are a fair sample.
  """
  if src.lookup is not None or src.pixels is not None:
    indices = np.unique(np.linspace(0, src.num_examples - 1, count,
                                    dtype=np.int64))
  if src.pixels is not None:
    return tf.data.Dataset.from_tensor_slices(
        (src.pixels.images[indices], src.pixels.labels[indices], indices))
  if src.lookup is not None:
    return tf.data.Dataset.from_tensor_slices(indices).map(
        tf.autograph.experimental.do_not_convert(
            lambda i: (*src.lookup(i), i)))
  return src.examples.take(count).enumerate().map(
      tf.autograph.experimental.do_not_convert(
          lambda i, example: (*example, i)))


def _examples(config, src, count: int):
  """(centre crops, labels, indices) of `count` examples spread over src."""
  # One centre crop: what the figures show and fc7 is taken on.
  centre = augment.Crops(config.resize_size, config.image_size)
  ds = _spread_sample(src, count).map(
      tf.autograph.experimental.do_not_convert(
          lambda encoded, label, index: dict(
              augment.eval_example(centre, encoded, label), index=index)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return sources.read_once(
      ds.batch(config.eval.batch_size).prefetch(tf.data.AUTOTUNE))


def first(config, src, count: int) -> dict[str, np.ndarray]:
  """The centre crops, labels and indices of `count` examples spread over src."""
  batches = list(_examples(config, src, count).as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def prediction_figure(probabilities_fn, params, names, images: np.ndarray,
                      labels: np.ndarray) -> tuple[np.ndarray, list[list]]:
  """Figure 4 (left) for `images` (centre crops), and each one's top 5.

  probabilities_fn: `inference.probabilities_fn(config)`, compiled once.
  """
  probabilities = np.asarray(probabilities_fn(params, images))
  tops = [inference.top5(p, names) for p in probabilities]
  panels = [prediction_panel(image, names[label], top)
            for image, label, top in zip(images, labels, tops)]
  return grid(panels, columns=4), tops


def tensorboard_images(config, eval_src, names):
  """The training loop's eval_images hook: params -> the conv1 grid, and
  prediction panels for the first 4 of eval_src; the network is compiled
  once, not at each call."""
  shown = first(config, eval_src, 4)
  probabilities_fn = inference.probabilities_fn(config)

  def draw(params) -> dict[str, np.ndarray]:
    predictions, _ = prediction_figure(probabilities_fn, params, names,
                                       shown['image'], shown['label'])
    return {'conv1_kernels': conv1_grid(np.asarray(params['conv1']['kernel'])),
            'predictions': predictions}
  return draw


def run(config, workdir: str, checkpoint: str, pool_size: int,
        allow_config_change: bool = False) -> dict:
  """Write the figures of workdir's checkpoint to workdir/figures."""
  params, step, names = inference.load(
      'figures', config, workdir, checkpoint, allow_config_change)
  out = os.path.join(workdir, 'figures')
  os.makedirs(out, exist_ok=True)
  save_png(conv1_figure(np.asarray(params['conv1']['kernel']), step),
           os.path.join(out, 'conv1_kernels.png'))

  eval_src = sources.source(config, config.dataset.eval_split)
  shown = first(config, eval_src, PREDICTION_IMAGES)
  figure, tops = prediction_figure(inference.probabilities_fn(config), params,
                                   names, shown['image'], shown['label'])
  save_png(with_title(figure, f'top 5 at step {step}: the true class in '
                              f'red'),
           os.path.join(out, 'predictions.png'))

  # Figure 4, right: fc7 of the queries against a sample of training images.
  model, mean = alexnet.build(config), device_preprocessing.mean(config)
  features = xla_cpu.jit(
      lambda p, x: inference.fc7_features(model, p, x, mean))
  train_src = sources.source(config, config.dataset.train_split)
  pool, pool_labels, pool_indices = [], [], []
  for batch in _examples(config, train_src, pool_size).as_numpy_iterator():
    pool.append(np.asarray(features(params, batch['image'])))
    pool_labels.append(batch['label'])
    pool_indices.append(batch['index'])
  pool, pool_labels = np.concatenate(pool), np.concatenate(pool_labels)
  pool_indices = np.concatenate(pool_indices)
  queries = shown['image'][:QUERIES]
  order, distances = nearest(np.asarray(features(params, queries)), pool,
                             NEIGHBOURS)
  # A second pass keeps only the images shown, not the whole pool's.
  wanted = {int(pool_indices[i]) for i in order.ravel()}
  pictures = {}
  for batch in _examples(config, train_src, pool_size).as_numpy_iterator():
    for image, index in zip(batch['image'], batch['index']):
      if int(index) in wanted:
        pictures[int(index)] = image
  query_column = grid([np.asarray(_tile(query)) for query in queries], 1)
  neighbour_columns = grid([np.asarray(_tile(pictures[int(pool_indices[i])]))
                            for row in order for i in row], NEIGHBOURS)
  gap = np.full((query_column.shape[0], QUERY_GAP, 3), 255, np.uint8)
  gap[:, QUERY_GAP // 2] = 0   # a line between the queries and the rest
  save_png(with_title(np.concatenate([query_column, gap, neighbour_columns],
                                     axis=1),
                      f'queries (left) and the {NEIGHBOURS} training images '
                      f'nearest each in fc7 space, step {step}'),
           os.path.join(out, 'neighbours.png'))

  numbers = {
      'step': step,
      'predictions': [
          {'eval_index': int(i), 'label': names[y], 'top5': top}
          for i, y, top in zip(shown['index'], shown['label'], tops)],
      'neighbours': [
          {'eval_index': int(shown['index'][q]),
           'label': names[shown['label'][q]],
           'nearest': [{'train_index': int(pool_indices[i]),
                        'label': names[pool_labels[i]],
                        'distance': round(float(d), 4)}
                       for i, d in zip(order[q], distances[q])]}
          for q in range(len(queries))],
      'pool_size': len(pool),
  }
  with open(os.path.join(out, 'figures.json'), 'w') as f:
    json.dump(numbers, f, indent=1)
  print(f'figures of step {step} in {out}', flush=True)
  return numbers
