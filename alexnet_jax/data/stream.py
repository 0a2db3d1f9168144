"""The streams that training and evaluation read: batches for the device.

The train stream is a pure function of the seed, the batch size and the
position: position p is example p % n of epoch p // n, in an order drawn from
the seed and the epoch, augmented with randomness drawn (a global batch at a
time) from the seed, p's global batch and its place in it. Each process
reads its part of every global batch. A run that resumes at step s starts the
stream at global batch s and sees exactly the examples and crops it would
have seen, with nothing to store but the step.

Train batches carry uint8 pixels and the PCA lighting shift drawn for each
image; the device subtracts the mean and adds the shift
(device_preprocessing.py), which keeps host-to-device traffic at a byte a
pixel.
"""

from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import dataset_stats
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.runtime import errors

_ENDLESS = 2**62
POSITION = 'position'   # an example's place in the job's train stream
_INDEX = 'index'        # the example a position reads, with random access



def process_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise errors.UserError(f'batch_size {global_batch} must divide evenly '
                           f'among {jax.process_count()} processes')
  return global_batch // jax.process_count()


def _epoch_order(config, num_examples: int, positions: tf.Tensor) -> tf.Tensor:
  """The example at each stream position: position mod n of epoch position
  div n, in an order drawn from the seed and the epoch.

  Eight rounds of the shuffle, not TensorFlow's default four: with four, a
  folder of a few hundred files (listed class by class) gave consecutive
  examples of one class twice as often as chance.
  """
  # The op's seeds are triples (augmentation's are pairs): zero fills them.
  seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(config.seed,
                                                             tf.int64)),
                    tf.zeros_like(positions), positions // num_examples], 1)
  return tf.raw_ops.RandomIndexShuffle(
      index=positions % num_examples, seed=seeds,
      max_index=tf.constant(num_examples - 1, tf.int64), rounds=8)


def _local_positions(step: tf.Tensor, local_batch: int) -> tf.Tensor:
  """The stream positions of this process's part of global batch `step`."""
  first = (step * jax.process_count() + jax.process_index()) * local_batch
  return first + tf.range(local_batch, dtype=tf.int64)


def positioned_examples(
    config, src: sources.Source, start_step: int, local_batch: int,
    per_example: Callable[..., object],
    per_batch: Optional[Callable[[tf.Tensor, Optional[tf.Tensor]],
                                 dict[str, tf.Tensor]]] = None,
) -> tf.data.Dataset:
  """per_example(bytes, label, info) of this process's examples in order,
  from its local batch start_step on, in one parallel map.

  info is a dict of one example's tensors: its POSITION in the job's stream,
  and its row of what per_batch(step, shapes) returns for the local batch
  (so work that can be done a batch at a time is); shapes are the batch's
  images' [height, width] where the source has them (Source.shapes), else
  None. Global batch s is split among the processes in order, as
  `parallel.shard_batch` puts it together again. With random access,
  position p is example p mod n of epoch p div n in that epoch's order, so
  the stream is the same for any number of processes.
  """
  @tf.autograph.experimental.do_not_convert
  def batch_info(step):
    positions = _local_positions(step, local_batch)
    info, shapes = {POSITION: positions}, None
    if src.lookup is not None:
      info[_INDEX] = _epoch_order(config, src.num_examples, positions)
      if src.shapes is not None:
        shapes = tf.gather(src.shapes, info[_INDEX])
    if per_batch:
      info.update(per_batch(step, shapes))
    return info

  infos = tf.data.Dataset.range(start_step, _ENDLESS).map(batch_info).unbatch()
  if src.lookup is not None:
    @tf.autograph.experimental.do_not_convert
    def example(info):
      info = dict(info)
      return per_example(*src.lookup(info.pop(_INDEX)), info)
    return infos.map(example, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)
  # A sequential source: this process's share through a shuffle buffer drawn
  # anew each epoch. Resuming re-reads (without decoding) the part of the
  # epoch already seen.
  n, seed = src.num_local, config.seed
  first_epoch, seen = divmod(start_step * local_batch, n)
  buffer = min(config.dataset.shuffle_buffer, n)
  epochs = tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(
      tf.autograph.experimental.do_not_convert(
          lambda epoch: src.examples.shuffle(
              buffer, seed=seed * 1_000_003 + epoch)))
  return tf.data.Dataset.zip((epochs.skip(seen), infos)).map(
      tf.autograph.experimental.do_not_convert(
          lambda example, info: per_example(*example, info)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(config, src: sources.Source,
                  start_step: int = 0) -> tf.data.Dataset:
  """Endless augmented batches for this process, from train step start_step.

  Each global batch's crops, flips and lighting are drawn at once from the
  seed and the step (augment.train_draws), and each process takes its rows
  (and finds its crops' windows, where the source has the images' shapes).
  """
  local_batch = process_batch_size(config.batch_size)
  seed = tf.constant([config.seed, 0], tf.int64)
  crops, pca = augment.Crops.of(config), dataset_stats.pca(config)

  def this_process_draws(step, shapes):
    draws = augment.train_draws(
        crops, tf.random.experimental.stateless_fold_in(seed, step),
        config.batch_size, pca, config.dataset.lighting_std)
    first = jax.process_index() * local_batch
    draws = {k: v[first:first + local_batch] for k, v in draws.items()}
    return (draws if shapes is None
            else augment.train_windows(crops, draws, shapes))

  if src.pixels is not None:
    return _pixel_batches(config, src, start_step, local_batch, crops,
                          this_process_draws).prefetch(tf.data.AUTOTUNE)
  ds = positioned_examples(
      config, src, start_step, local_batch,
      lambda encoded, label, info: augment.train_example(crops, encoded,
                                                         label, info),
      this_process_draws)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _pixel_batches(config, src: sources.Source, start_step: int,
                   local_batch: int, crops: augment.Crops,
                   draws_of: Callable[[tf.Tensor, None], dict[str, tf.Tensor]]
                   ) -> tf.data.Dataset:
  """train_dataset's batches from a source of pixels (a raw store, or kept
  in memory): the same examples, crops and draws as from image files, each
  batch's crops cut in one gather (raw_store.Pixels.crops)."""
  labels = tf.constant(src.pixels.labels)

  @tf.autograph.experimental.do_not_convert
  def batch(step):
    index = _epoch_order(config, src.num_examples,
                         _local_positions(step, local_batch))
    draws = draws_of(step, None)
    return {
        device_preprocessing.IMAGE: src.pixels.tf_crops(
            index, draws[augment.TOP], draws[augment.LEFT], crops.image_size),
        device_preprocessing.LABEL: tf.gather(labels, index),
        device_preprocessing.FLIP: draws[device_preprocessing.FLIP],
        device_preprocessing.LIGHTING: draws[device_preprocessing.LIGHTING]}

  return tf.data.Dataset.range(start_step, _ENDLESS).map(
      batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def eval_batches(config, src: sources.Source,
                 global_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of this process's share exactly once, in full batches.

  Padding fills the last batch, and whole batches where this process has
  fewer examples than another, so every process runs the same number of
  steps; device_preprocessing.MASK is 1 for real examples only.
  """
  batch = process_batch_size(global_batch)
  most_per_process = -(-src.num_examples // jax.process_count())
  num_batches = -(-most_per_process // batch)
  crops = augment.Crops.of(config)
  ds = src.examples.map(tf.autograph.experimental.do_not_convert(
      lambda x, y: augment.eval_example(crops, x, y)),
                        num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  ds = sources.read_once(ds.batch(batch).prefetch(tf.data.AUTOTUNE))
  # A process with no examples left (or none at all) pads from this.
  empty = {k: np.zeros((0,) + tuple(spec.shape[1:]),
                       spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  batches = ds.as_numpy_iterator()
  for _ in range(num_batches):
    b = next(batches, None) or dict(empty)
    real = b[device_preprocessing.LABEL].shape[0]
    b[device_preprocessing.MASK] = np.ones(real, np.float32)
    if real < batch:
      b = {k: np.concatenate([v, np.zeros((batch - real,) + v.shape[1:],
                                          v.dtype)]) for k, v in b.items()}
    yield b


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)
