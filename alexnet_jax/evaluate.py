"""Top-1 / top-5 error of parameters over a whole evaluation split."""

import jax
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import input_pipeline
from alexnet_jax import metric_writer
from alexnet_jax import parallel
from alexnet_jax import train


def evaluate_params(config, mesh, eval_step, params,
                    src: input_pipeline.Source) -> dict[str, float]:
  """Mean loss, top-1 and top-5 error, each example counted exactly once.

  'examples' is how many were evaluated over all processes: the split less
  any files screened out as undecodable.
  """
  totals = None
  for batch in input_pipeline.eval_batches(config, src):
    sums = eval_step(params, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  return dict(train.means(totals), examples=int(totals['count']))


def run(config, workdir: str) -> dict[str, float]:
  """--mode=eval: evaluate the latest checkpoint in workdir."""
  mesh = parallel.make_mesh(config)
  parallel.check_batch(config.eval.batch_size, mesh, 'eval.batch_size')
  mngr = checkpoints.manager(workdir, read_only=True)
  state = checkpoints.restore(mngr, train.abstract_train_state(config, mesh))
  src = input_pipeline.source(config, config.dataset.eval_split)
  metrics = evaluate_params(config, mesh, train.make_eval_step(config, mesh),
                            state.params, src)
  split = f'eval_{config.eval.crops}crop'
  metric_writer.MetricWriter(workdir).write(int(state.step), split, metrics)
  print(f'step {int(state.step)} {split}: ' + ', '.join(
      f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
      for k, v in sorted(metrics.items())), flush=True)
  return metrics
