"""Top-1 / top-5 error of parameters over a whole evaluation split: what the
training loop logs at each evaluation and --mode=eval reports."""

import jax
import numpy as np

from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.model import parallel
from alexnet_jax.runtime import progress
from alexnet_jax.train import steps


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
