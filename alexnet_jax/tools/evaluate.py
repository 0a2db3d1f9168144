"""--mode=eval: a checkpoint, or an ensemble of them, scored on a split."""

import os
import time

from alexnet_jax.data import sources
from alexnet_jax.model import parallel
from alexnet_jax.runtime import console
from alexnet_jax.tools import inference
from alexnet_jax.train import checkpoints
from alexnet_jax.train import evaluation
from alexnet_jax.train import metric_writer
from alexnet_jax.train import steps


def run(config, workdir: str, checkpoint: str = 'latest',
        ensemble: tuple[str, ...] = (), allow_config_change: bool = False,
        data_note: str = '') -> dict[str, float]:
  """--mode=eval: evaluate a checkpoint of workdir on any mesh.

  checkpoint: 'latest', 'best' or a step. ensemble: more members as
  'WORKDIR' or 'WORKDIR@WHICH'; their softmax is averaged with workdir's, as
  in the paper's 5-network result. The metrics go to workdir's metrics.jsonl
  at the checkpoint's step. data_note: inference.with_training_data's.
  """
  started = time.monotonic()
  checkpoints.check_class_names(workdir, sources.class_names(config),
                                config.dataset.name)
  mesh = parallel.make_mesh(config)
  specs = (f'{workdir}@{checkpoint}', *ensemble)
  params, member_steps = zip(*[
      inference.restore_params(config, mesh, spec, allow_config_change)
      for spec in specs])
  src = sources.training_source(config, config.dataset.eval_split)
  metrics = evaluation.evaluate_params(
      config, mesh, steps.make_eval_step(config, mesh), params, src)
  step = member_steps[0]
  split = f'eval_{config.eval.crops}crop'
  if ensemble:
    split = f'ensemble{len(specs)}_{config.eval.crops}crop'
    console.report('ensemble of ' + ', '.join(
        f'{os.path.abspath(spec.partition("@")[0])}@{s}'
        for spec, s in zip(specs, member_steps)))
  evaluation.record(metric_writer.MetricWriter(workdir), step, split, config,
                    metrics, data_note, time.monotonic() - started)
  return metrics
