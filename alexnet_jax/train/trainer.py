"""The training loop: data in, steps, logs, evaluations and checkpoints out."""

import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from alexnet_jax import config as config_lib
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.model import parallel
from alexnet_jax.runtime import console
from alexnet_jax.runtime import distributed
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files
from alexnet_jax.runtime import host
from alexnet_jax.runtime import interrupts
from alexnet_jax.train import checkpoints
from alexnet_jax.train import evaluation
from alexnet_jax.train import metric_writer
from alexnet_jax.train import optimizer
from alexnet_jax.train import preemption
from alexnet_jax.train import steps


class NonFiniteLossError(errors.UserError):
  """Training diverged; the last good checkpoint is kept."""


def _diverged(mngr, what: str, step: int) -> NonFiniteLossError:
  checkpoints.finish(mngr)
  kept = mngr.latest_step()
  kept = ('no checkpoint was saved yet' if kept is None else
          f'the last good checkpoint, step {kept}, is kept in {mngr.directory}')
  return NonFiniteLossError(
      f'{what} by step {step}; {kept}. Lower --config.learning_rate (to resume '
      f'with it, add --allow_config_change)')


class Intervals:
  """The one rule for when the loop logs, evaluates and saves (as
  big_vision's itstime): at every `every`-th step and at the last one.

  The config's interval keys give N for every N steps, -1 for once an epoch
  and 0 for only at the end.
  """

  def __init__(self, config, steps_per_epoch: int, total_steps: int):
    in_steps = lambda value: {-1: steps_per_epoch, 0: total_steps}.get(
        value, value)
    self.total_steps = total_steps
    self._every = {'log': config.log_every_steps,
                   'eval': in_steps(config.eval_every_steps),
                   'checkpoint': in_steps(config.checkpoint_every_steps)}

  def its_time(self, what: str, step: int) -> bool:
    return step == self.total_steps or step % self._every[what] == 0


def eta_text(remaining_steps: int, train_seconds: float,
             timed_steps: int) -> str:
  """The time left at the rate this process has trained at, leaving out its
  compilation and evaluations ('?' before a step has been timed)."""
  if timed_steps <= 0:
    return '?'
  return f'{remaining_steps * train_seconds / timed_steps / 60:.1f} min'


def _log_progress(step, total, metrics, images_per_sec, eta):
  console.report(
      f'step {step}/{total}: loss {metrics["loss"]:.4f}, top1_error '
      f'{metrics["top1_error"]:.3f}, lr {metrics["learning_rate"]:.2g}, '
      f'{images_per_sec:.0f} images/sec, ETA {eta}')


def _check_memory(config, mesh) -> None:
  """Refuse a network whose parameters and optimizer state cannot fit.

  A step holds the state, its gradients and the updated state: about three
  times the state's bytes on each device (split over 'tower' where the
  layers are). Activations come on top, so this only catches what surely
  fails, such as an image_size whose fc6 grows past memory.
  """
  shapes = jax.eval_shape(lambda: steps.create_train_state(config))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  per_device = 3 * state_bytes / mesh.shape[parallel.TOWER]
  device = mesh.devices.flat[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and 'bytes_limit' in stats:
    needed, available = per_device, stats['bytes_limit']
    where = f'each {device.platform.upper()} has'
  else:  # CPU devices share the host's memory
    needed = per_device * len([d for d in mesh.devices.flat
                               if d.process_index == jax.process_index()])
    available = host.physical_memory()
    where = 'this machine has'
  if needed > available:
    raise errors.UserError(
        f'{config.model.variant} at image_size={config.image_size} and '
        f'model.width={config.model.width} has {state_bytes / 2 / 1e9:.1f} GB '
        f'of parameters and momentum; training needs about '
        f'{needed / 1e9:.1f} GB but {where} {available / 1e9:.1f} GB: lower '
        f'image_size or model.width')


def _write_config(config, workdir: str) -> None:
  """The run's config as JSON, written before the first step, so that a run
  killed before its first checkpoint still says what it was."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'config.json')
    with files.atomic_write(path) as f:
      f.write(config.to_json(indent=1))


def _resume_or_start(config, mesh, mngr, allow_config_change: bool):
  """The newest intact checkpoint's state, or the initial one if there is
  none. Damaged checkpoints are set aside, with a warning."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      if not allow_config_change:
        checkpoints.check_config(mngr, step, config,
                                 ignore=config_lib.MAY_CHANGE_ON_RESUME)
      return checkpoints.restore(
          mngr, steps.abstract_train_state(config, mesh), step)
    except checkpoints.DamagedCheckpoint as e:
      moved = checkpoints.set_aside(mngr, step)
      console.warning(f'{e}; moved to {moved}, resuming from an earlier one')
  return steps.create_sharded_train_state(config, mesh)


# The hook through which the loop draws images for TensorBoard at each
# evaluation: (config, eval source, class names) -> (params -> {name: uint8
# image}). The tools provide it (figures.tensorboard_images), so training
# does not depend on them.
EvalImages = Callable[[Any, sources.Source, tuple[str, ...]],
                      Callable[[Any], dict[str, np.ndarray]]]


def _evaluate(config, mesh, eval_step, eval_src, state, writer, figures_of):
  """Evaluate the state and log its metrics."""
  step = int(state.step)
  metrics = evaluation.evaluate_params(config, mesh, eval_step,
                                       (state.params,), eval_src)
  split = f'eval_{config.eval.crops}crop'
  evaluation.record(writer, step, split, config, metrics)
  if figures_of is not None:
    writer.write_images(step, split, figures_of(state.params))
  return metrics


def _resume_hint(mngr) -> str:
  """Where the same command would resume from, for the line a process
  prints when another process of the job is lost."""
  step = checkpoints.newest_on_disk(mngr)
  if step is None:
    return 'run the same command to start again (no checkpoint was saved yet)'
  return (f'run the same command to resume from step {step} (its checkpoint '
          f'is in {mngr.directory})')


class _StepTrace:
  """A jax.profiler trace of the steps after `start` up to `end`, in
  WORKDIR/profile, for TensorBoard's profile plugin and Perfetto."""

  def __init__(self, step_range: Optional[tuple[int, int]], workdir: str):
    self._steps, self._tracing = step_range, False
    self._folder = os.path.join(workdir, 'profile')

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self._folder, create_perfetto_trace=True)
      self._tracing = True

  def after(self, step: int, state) -> None:
    if self._tracing and step == self._steps[1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._tracing = False
      console.report(f'profile of steps {self._steps[0] + 1}-{step} '
                           f'written to {self._folder}')


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       profile_steps: Optional[tuple[int, int]] = None,
                       eval_images: Optional[EvalImages] = None
                       ) -> steps.TrainState:
  """Train from scratch, or resume from the latest checkpoint in workdir.

  A resumed run must have the config it started with, but for the keys in
  config.MAY_CHANGE_ON_RESUME, unless allow_config_change. profile_steps:
  (start, end) to trace the steps after start up to end. eval_images: what
  to draw to TensorBoard at each evaluation (single-process runs only, where
  one process holds all the parameters).
  """
  checkpoints.check_class_names(workdir, sources.class_names(config),
                                config.dataset.name)
  train_src = sources.training_source(config, config.dataset.train_split)
  eval_src = sources.training_source(config, config.dataset.eval_split)
  names = sources.output_names(config, train_src.class_names)
  steps_per_epoch = stream.steps_per_epoch(config, train_src.num_examples)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  intervals = Intervals(config, steps_per_epoch, total_steps)

  mesh = parallel.make_mesh(config)
  towers = steps.mesh_towers(config, mesh)
  parallel.check_batch(config.batch_size, mesh, towers, 'batch_size')
  _check_memory(config, mesh)
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  distributed.on_loss_say(lambda: _resume_hint(mngr))
  try:
    state = _resume_or_start(config, mesh, mngr, allow_config_change)
    step = int(state.step)
    if step > total_steps:
      raise errors.UserError(
          f'the checkpoint in {mngr.directory} is at step {step}, past '
          f'num_train_steps={total_steps}: raise --config.num_train_steps (or '
          f'num_epochs) to train on, or evaluate it with --mode=eval')
    if step == total_steps:
      console.report(f'the checkpoint in {mngr.directory} is at step '
                     f'{step} of {total_steps}: training is complete')
      return state
    _write_config(config, workdir)
    checkpoints.save_class_names(workdir, train_src.class_names)
    train_step = steps.make_train_step(config, mesh, steps_per_epoch)
    eval_step = steps.make_eval_step(config, mesh)
    writer = metric_writer.MetricWriter(workdir)
    writer.mark_replayed(step)
    figures_of = (eval_images(config, eval_src, names)
                  if eval_images and jax.process_count() == 1 else None)

    batches = parallel.device_batches(stream.train_dataset(
        config, train_src, start_step=step).as_numpy_iterator(), mesh, towers)
    pending, last_log_time, last_log_step = [], time.time(), step
    train_seconds, timed_steps, past_compilation = 0.0, 0, False
    interrupts.raise_if_seen()  # a Ctrl-C dropped while starting up
    console.report(
        f'training {config.model.variant} for {total_steps} steps '
        f'({steps_per_epoch} per epoch) from step {step} on mesh '
        f'data={mesh.shape[parallel.DATA]}, tower={mesh.shape[parallel.TOWER]}')
    trace = _StepTrace(profile_steps, workdir)
    with preemption.StopRequests(mngr) as stop_requests:
      while step < total_steps:
        trace.before(step)
        state, metrics = train_step(state, next(batches))
        step += 1
        trace.after(step, state)
        pending.append(metrics)
        if intervals.its_time('log', step):
          stacked = jax.tree.map(lambda *xs: np.stack(xs), *pending)
          means = {k: float(np.mean(v))
                   for k, v in jax.device_get(stacked).items()}
          pending = []
          if not np.isfinite(means['loss']):
            raise _diverged(mngr, f'the loss became {means["loss"]}', step)
          now = time.time()
          images_per_sec = ((step - last_log_step) * config.batch_size
                            / (now - last_log_time))
          if past_compilation:  # the first interval includes compiling
            train_seconds += now - last_log_time
            timed_steps += step - last_log_step
          past_compilation = True
          last_log_time, last_log_step = now, step
          writer.write(step, 'train',
                       dict(means, images_per_sec=images_per_sec))
          _log_progress(step, total_steps, means, images_per_sec,
                        eta_text(total_steps - step, train_seconds,
                                 timed_steps))
        eval_metrics = None
        if intervals.its_time('eval', step):
          # Finish the queued train steps first, so their time stays in the
          # train images/sec and out of the evaluation's.
          jax.block_until_ready(state)
          eval_started = time.time()
          eval_metrics = _evaluate(config, mesh, eval_step, eval_src, state,
                                   writer, figures_of)
          if config.lr_schedule == 'plateau':  # the rate falls on a plateau
            state = state.replace(plateau=optimizer.update_plateau(
                state.plateau, eval_metrics['top1_error'],
                patience=config.plateau.patience,
                max_reductions=config.plateau.max_reductions,
                min_delta=config.plateau.min_delta))
          last_log_time += time.time() - eval_started
        stopping = stop_requests.requested(step)
        if (eval_metrics is not None or stopping
            or intervals.its_time('checkpoint', step)):
          if not steps.all_finite(state.params):
            raise _diverged(mngr, 'the parameters became non-finite', step)
          checkpoints.save(mngr, state, config, eval_metrics)
        if stopping and step < total_steps:
          checkpoints.finish(mngr)
          raise preemption.Stopped(
              f'stopped at step {step} on request; its checkpoint is saved in '
              f'{mngr.directory}: run the same command to resume',
              stop_requests.exit_status)
    checkpoints.finish(mngr)
    return state
  finally:
    # A run stopped before its first save (a Ctrl-C while it compiles)
    # leaves no empty checkpoints folder behind.
    checkpoints.remove_if_empty(mngr)
