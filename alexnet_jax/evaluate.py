"""Top-1 / top-5 error of parameters over a whole evaluation split."""

import jax
import numpy as np

from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import metric_writer
from alexnet_jax import normalization
from alexnet_jax import parallel
from alexnet_jax import progress
from alexnet_jax import steps


def evaluate_params(config, mesh, eval_step, members: tuple,
                    src: input_pipeline.Source) -> dict[str, float]:
  """Mean loss, top-1 and top-5 error, each example counted exactly once.

  members: the parameters of one network, or of an ensemble, in a tuple.

  'examples' is how many were evaluated over all processes: the split less
  any files screened out as undecodable.
  """
  totals, towers = None, steps.mesh_towers(config, mesh)
  global_batch = parallel.padded_batch(config.eval.batch_size, mesh, towers)
  shown = progress.Progress(
      config, f'evaluation ({config.eval.crops}-crop)', src.num_examples)
  for batch in input_pipeline.eval_batches(config, src, global_batch):
    sums = eval_step(members, parallel.shard_batch(batch, mesh, towers))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    # Every process runs the same batches: count this one's share times all.
    shown.add(int(batch[normalization.MASK].sum()) * jax.process_count())
  totals = jax.device_get(totals)
  return dict(steps.means(totals), examples=int(totals['count']))


def run(config, workdir: str, checkpoint: str = 'latest',
        ensemble: tuple[str, ...] = (),
        allow_config_change: bool = False) -> dict[str, float]:
  """--mode=eval: evaluate a checkpoint of workdir on any mesh.

  checkpoint: 'latest', 'best' or a step. ensemble: more members as
  'WORKDIR' or 'WORKDIR@WHICH'; their softmax is averaged with workdir's, as
  in the paper's 5-network result. The metrics go to workdir's metrics.jsonl
  at the checkpoint's step.
  """
  mesh = parallel.make_mesh(config)
  specs = (f'{workdir}@{checkpoint}', *ensemble)
  params, member_steps = zip(*[inference.restore_params(config, mesh, spec,
                                                 allow_config_change)
                        for spec in specs])
  src = input_pipeline.training_source(config, config.dataset.eval_split)
  metrics = evaluate_params(config, mesh, steps.make_eval_step(config, mesh),
                            params, src)
  step = member_steps[0]
  split = f'eval_{config.eval.crops}crop'
  if ensemble:
    split = f'ensemble{len(specs)}_{config.eval.crops}crop'
    metric_writer.report('ensemble of ' + ', '.join(
        f'{spec.partition("@")[0]}@{s}' for spec, s in zip(specs, member_steps)))
  metric_writer.MetricWriter(workdir).write(step, split, metrics)
  metric_writer.report(f'step {step} {split}: ' + ', '.join(
      f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
      for k, v in sorted(metrics.items())))
  return metrics
