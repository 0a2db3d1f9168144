"""Orbax checkpoints of the train state, with the config each was made with.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames it), so a crash during a save leaves the previous one restorable.
The last `keep` checkpoints are kept, and also the one with the lowest
evaluation top-1 error, whose metrics are saved with it.
"""

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax import config as config_lib
from alexnet_jax import errors

BEST_METRIC = 'top1_error'

# Orbax warns each time a checkpoint folder is opened read-only (evaluation
# asks for that) and at each save without metrics (those between evaluations).
_EXPECTED_WARNINGS = ('Given directory is read only',
                      'did not provide metrics')
logging.getLogger('absl').addFilter(
    lambda record: not any(w in record.getMessage()
                           for w in _EXPECTED_WARNINGS))


class CheckpointError(errors.UserError):
  """A checkpoint is missing or does not fit; the message says how to fix it."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _no_checkpoint(path) -> CheckpointError:
  return CheckpointError(f'no checkpoint in {path}: train first, or point '
                         f'--workdir at a training run')


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def manager(workdir: str, keep: Optional[int] = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Checkpoints in workdir; read_only: for evaluation, never creates files."""
  if read_only and not os.path.isdir(directory(workdir)):
    raise _no_checkpoint(directory(workdir))
  keep_latest_and_best = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                     keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode='min',
      preservation_policy=keep_latest_and_best,
      create=not read_only, read_only=read_only,
      save_interval_steps=0 if read_only else 1,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(
      directory(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, state, config,
         eval_metrics: Optional[dict[str, float]] = None) -> None:
  """Start an asynchronous save of `state` at its step.

  eval_metrics, when the state was just evaluated, rank it for 'best'.
  """
  mngr.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))),
            metrics=eval_metrics)


def find_step(mngr: ocp.CheckpointManager, which: str = 'latest') -> int:
  """The step `which` names: 'latest', 'best' (lowest top-1 error) or a number."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise _no_checkpoint(mngr.directory)
  if which == 'latest':
    return steps[-1]
  if which == 'best':
    step = mngr.best_step()
    if step is None:
      raise CheckpointError(
          f'no checkpoint in {mngr.directory} was evaluated, so none is best: '
          f'use --checkpoint=latest or one of the steps {steps}')
    return step
  if not which.isdigit():
    raise CheckpointError(f'--checkpoint={which}: use latest, best or a step '
                          f'number')
  if int(which) not in steps:
    raise CheckpointError(f'no checkpoint {which} in {mngr.directory}: it has '
                          f'steps {steps}')
  return int(which)


def check_config(mngr: ocp.CheckpointManager, step: int, config,
                 only: Optional[tuple] = None, ignore: tuple = ()) -> None:
  """Refuse a config that differs from the one checkpoint `step` was made
  with, naming the keys (see config.changes for only and ignore)."""
  stored = mngr.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore())).config
  changed = config_lib.changes(stored, config, only=only, ignore=ignore)
  if changed:
    raise CheckpointError(
        f'the config differs from the one checkpoint {step} in '
        f'{mngr.directory} was made with: {"; ".join(changed)}. Use the same '
        f'values, or add --allow_config_change to go on with the new ones')


def _shapes(tree) -> dict[str, tuple]:
  """Each leaf's shape by its path of names ('params/fc8/kernel')."""
  def name(entry):
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {'/'.join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Compare shapes before restoring: a failed Orbax restore floods stderr."""
  stored = _shapes(mngr.item_metadata(step)['state'])
  wanted = _shapes(abstract_state)
  # Parameters first: they name the layer that differs.
  for key in sorted(set(stored) | set(wanted),
                    key=lambda k: (not k.startswith('params/'), k)):
    if stored.get(key) != wanted.get(key):
      raise CheckpointError(
          f'checkpoint {step} in {mngr.directory} does not fit this config: '
          f'{key} is {stored.get(key, "absent")} there and '
          f'{wanted.get(key, "absent")} here. Set model.variant, model.width '
          f'and model.num_classes as in the run that wrote it')


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int):
  """The state at `step`, shaped and sharded like `abstract_state`."""
  _check_shapes(mngr, step, abstract_state)
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state))).state
