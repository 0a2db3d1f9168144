"""The training loop: data in, steps, logs, evaluations and checkpoints out."""

import time

from absl import logging
import jax
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import errors
from alexnet_jax import evaluate
from alexnet_jax import input_pipeline
from alexnet_jax import metric_writer
from alexnet_jax import optimizer
from alexnet_jax import parallel
from alexnet_jax import train


class NonFiniteLossError(errors.UserError):
  """Training diverged; the last good checkpoint is kept."""


def _every(config_value: int, default: int) -> int:
  return default if config_value <= 0 else config_value


def _log_progress(step, total, metrics, images_per_sec, started):
  elapsed = time.time() - started
  eta = '?' if step == 0 else f'{elapsed / step * (total - step) / 60:.1f} min'
  print(f'step {step}/{total}: loss {metrics["loss"]:.4f}, top1_error '
        f'{metrics["top1_error"]:.3f}, lr {metrics["learning_rate"]:.2g}, '
        f'{images_per_sec:.0f} images/sec, ETA {eta}', flush=True)


def train_and_evaluate(config, workdir: str) -> train.TrainState:
  """Train from scratch, or resume from the latest checkpoint in workdir."""
  train_src = input_pipeline.source(config, config.dataset.train_split)
  eval_src = input_pipeline.source(config, config.dataset.eval_split)
  if len(train_src.class_names) > config.model.num_classes:
    raise input_pipeline.DatasetError(
        f'the dataset has {len(train_src.class_names)} classes but '
        f'model.num_classes is {config.model.num_classes}: set '
        f'--config.model.num_classes={len(train_src.class_names)}')
  steps_per_epoch = input_pipeline.steps_per_epoch(config,
                                                   train_src.num_examples)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  eval_every = _every(config.eval_every_steps, steps_per_epoch)
  checkpoint_every = _every(config.checkpoint_every_steps, total_steps)

  mesh = parallel.make_mesh(config)
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  parallel.check_batch(config.eval.batch_size, mesh, 'eval.batch_size')
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoints.restore(mngr, train.abstract_train_state(config, mesh))
    logging.info('resumed from step %d', int(state.step))
  else:
    state = train.create_sharded_train_state(config, mesh)
  train_step = train.make_train_step(config, mesh, steps_per_epoch)
  eval_step = train.make_eval_step(config, mesh)
  writer = metric_writer.MetricWriter(workdir)

  step = int(state.step)
  batches = input_pipeline.train_dataset(
      config, train_src, start_step=step).as_numpy_iterator()
  pending, last_log_time, last_log_step = [], time.time(), step
  started = time.time()
  print(f'training {config.model.variant} for {total_steps} steps '
        f'({steps_per_epoch} per epoch) from step {step} on mesh '
        f'data={mesh.shape[parallel.DATA]}, tower={mesh.shape[parallel.TOWER]}',
        flush=True)
  while step < total_steps:
    state, metrics = train_step(state,
                                parallel.shard_batch(next(batches), mesh))
    step += 1
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      means = {k: float(np.mean(v))
               for k, v in jax.device_get(
                   jax.tree.map(lambda *xs: np.stack(xs), *pending)).items()}
      pending = []
      if not np.isfinite(means['loss']):
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f'loss became {means["loss"]} by step {step}; the last good '
            f'checkpoint in {checkpoints.directory(workdir)} is kept: lower '
            f'--config.learning_rate and run again')
      now = time.time()
      images_per_sec = ((step - last_log_step) * config.batch_size
                        / (now - last_log_time))
      last_log_time, last_log_step = now, step
      writer.write(step, 'train', dict(means, images_per_sec=images_per_sec))
      _log_progress(step, total_steps, means, images_per_sec, started)
    if step % eval_every == 0 or step == total_steps:
      # Finish the queued train steps first, so their time stays in the
      # train images/sec and out of the evaluation's.
      jax.block_until_ready(state)
      eval_started = time.time()
      eval_metrics = evaluate.evaluate_params(config, mesh, eval_step,
                                              state.params, eval_src)
      writer.write(step, 'eval', eval_metrics)
      print(f'step {step} eval: top1_error {eval_metrics["top1_error"]:.4f}, '
            f'top5_error {eval_metrics["top5_error"]:.4f}, loss '
            f'{eval_metrics["loss"]:.4f}', flush=True)
      if config.lr_schedule == 'plateau':
        state = state.replace(plateau=optimizer.update_plateau(
            state.plateau, eval_metrics['top1_error'],
            patience=config.plateau.patience,
            max_reductions=config.plateau.max_reductions,
            min_delta=config.plateau.min_delta))
      last_log_time += time.time() - eval_started
    if step % checkpoint_every == 0 or step == total_steps:
      checkpoints.save(mngr, state, config)
  mngr.wait_until_finished()
  return state
