"""Top-1 / top-5 error of parameters over a whole evaluation split: what the
training loop logs at each evaluation and --mode=eval reports."""

from typing import Optional

import jax
import numpy as np

from alexnet_jax import config as config_lib
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.model import parallel
from alexnet_jax.runtime import console
from alexnet_jax.runtime import progress
from alexnet_jax.train import metric_writer
from alexnet_jax.train import steps

# The order of an evaluation's metrics in its line and its record.
_ORDER = ('top1_error', 'top5_error', 'loss', 'examples')


def evaluate_params(config, mesh, eval_step, members: tuple,
                    src: sources.Source) -> dict[str, float]:
  """Mean loss, top-1 and top-5 error, each example counted exactly once.

  members: the parameters of one network, or of an ensemble, in a tuple.

  'examples' is how many were evaluated over all processes: the split less
  any files screened out as undecodable.
  """
  totals, towers = None, steps.mesh_towers(config, mesh)
  global_batch = parallel.padded_batch(config.eval.batch_size, mesh, towers)
  shown = progress.Progress(config.progress_every_s,
                            f'evaluation ({config.eval.crops}-crop)',
                            src.num_examples)
  for batch in stream.eval_batches(config, src, global_batch):
    sums = eval_step(members, parallel.shard_batch(batch, mesh, towers))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    # Every process runs the same batches: count this one's share times all.
    shown.add(int(batch[device_preprocessing.MASK].sum())
              * jax.process_count())
  totals = jax.device_get(totals)
  return dict(steps.means(totals), examples=int(totals['count']))


def record(writer: metric_writer.MetricWriter, step: int, split: str, config,
           metrics: dict[str, float], note: str = '',
           seconds: Optional[float] = None) -> None:
  """An evaluation's metrics to metrics.jsonl and one line: the same for
  training's evaluations and --mode=eval, each naming the dataset and the
  split it scored (note: what the tools add when the command line chose
  other data than the training run's), and how long it took where
  `seconds` says."""
  data = config_lib.data_name(config)
  ordered = {k: metrics[k] for k in _ORDER if k in metrics}
  writer.write(step, split, ordered, labels={
      'dataset': data, 'dataset_split': config.dataset.eval_split})
  console.report(
      f'step {step} {split} on {data} {config.dataset.eval_split}{note}: '
      + ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                  for k, v in ordered.items())
      + ('' if seconds is None else f', in {seconds:.1f} s'))
