"""Orbax checkpoints of the train state, with the config each was made with.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames it), so a crash during a save leaves the previous one restorable.
"""

import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from alexnet_jax import errors


class CheckpointError(errors.UserError):
  """A checkpoint is missing or does not fit; the message says how to fix it."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _no_checkpoint(path) -> CheckpointError:
  return CheckpointError(f'no checkpoint in {path}: train first, or point '
                         f'--workdir at a training run')


def manager(workdir: str, keep: Optional[int] = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Checkpoints in workdir; read_only: for evaluation, never creates files."""
  if read_only and not os.path.isdir(directory(workdir)):
    raise _no_checkpoint(directory(workdir))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(directory(workdir), options=options,
                               item_names=('state', 'config'))


def save(mngr: ocp.CheckpointManager, state, config) -> None:
  """Start an asynchronous save of `state` at its step."""
  mngr.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))))


def restore(mngr: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None):
  """The state at `step` (default: latest), shaped like `abstract_state`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise _no_checkpoint(mngr.directory)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except (ValueError, KeyError) as e:
    raise CheckpointError(
        f'checkpoint {step} in {mngr.directory} does not fit this config '
        f'(model.variant, model.width, model.num_classes must match the run '
        f'that wrote it): {str(e).splitlines()[0]}') from e
  return restored.state
