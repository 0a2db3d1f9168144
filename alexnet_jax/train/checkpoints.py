"""Orbax checkpoints of the train state, with the config each was made with.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames it), so a crash during a save leaves the previous one restorable.
The last `keep` checkpoints are kept, and also the one with the lowest
evaluation top-1 error, whose metrics are saved with it.

Orbax does not check what it reads back, so each finished checkpoint is
sealed with the size and CRC-32 of every file of its state and config
(checksums.json; Orbax's own top-level metadata may be rewritten), and
checked against them before it is used. Training resumes from the newest
checkpoint that passes, setting damaged ones aside as STEP.damaged;
evaluation refuses a damaged one.
"""

import json
import logging
import os
import shutil
import zlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax import config as config_lib
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files

BEST_METRIC = 'top1_error'

# Orbax warns each time a checkpoint folder is opened read-only (evaluation
# asks for that), at each save without metrics (those between evaluations),
# and about a damaged step folder, which verify() names in its own words.
_EXPECTED_WARNINGS = ('Given directory is read only',
                      'did not provide metrics',
                      'Metadata file does not exist')
logging.getLogger('absl').addFilter(
    lambda record: not any(w in record.getMessage()
                           for w in _EXPECTED_WARNINGS))


CHECKSUM_FILE = 'checksums.json'
DAMAGED_SUFFIX = '.damaged'


class CheckpointError(errors.UserError):
  """A checkpoint is missing or does not fit; the message says how to fix it."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint's files are not what was saved (or cannot be read)."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _no_checkpoint(path) -> CheckpointError:
  return CheckpointError(f'no checkpoint in {path}: train first, or give '
                         f'the workdir of a training run')


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


def newest_on_disk(mngr: ocp.CheckpointManager) -> Optional[int]:
  """The newest finished step in the folder (None if none), as it is now:
  also where another process's save finished a moment ago."""
  folder = str(mngr.directory)
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if (
      os.path.isdir(folder)) else []
  return max(steps, default=None)


def remove_if_empty(mngr: ocp.CheckpointManager) -> None:
  """Remove the checkpoints folder where nothing was saved in it."""
  folder = str(mngr.directory)
  if jax.process_index() == 0 and os.path.isdir(folder) and not os.listdir(
      folder):
    os.rmdir(folder)


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


# The items whose bytes are checked: what a restore reads. Orbax may rewrite
# its own metadata files at the top of a step folder.
_CHECKED_ITEMS = ('state', 'config')


def _file_checksums(folder: str) -> dict[str, list[int]]:
  """[size, CRC-32] of every file of the checked items under folder."""
  sums = {}
  for item in _CHECKED_ITEMS:
    for root, _, names in os.walk(os.path.join(folder, item)):
      for name in names:
        path = os.path.join(root, name)
        crc = 0
        with open(path, 'rb') as f:
          while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
        sums[os.path.relpath(path, folder)] = [os.path.getsize(path), crc]
  return sums


def _seal_finished(mngr: ocp.CheckpointManager) -> None:
  """Write the checksums of each finished checkpoint that has none yet."""
  if jax.process_index() != 0:
    return
  for step in mngr.all_steps():
    folder = _step_dir(mngr, step)
    target = os.path.join(folder, CHECKSUM_FILE)
    if os.path.isdir(folder) and not os.path.exists(target):
      sums = _file_checksums(folder)
      with files.atomic_write(target) as f:
        json.dump(sums, f)


def finish(mngr: ocp.CheckpointManager) -> None:
  """Wait for the save in progress, then seal every finished checkpoint."""
  mngr.wait_until_finished()
  _seal_finished(mngr)


def verify(mngr: ocp.CheckpointManager, step: int) -> None:
  """Raise DamagedCheckpoint unless checkpoint `step`'s files are as saved.

  A checkpoint saved just before a crash may not be sealed yet; it is only
  checked for being readable, by the restore.
  """
  folder = _step_dir(mngr, step)
  seal = os.path.join(folder, CHECKSUM_FILE)
  if not os.path.exists(seal):
    if not os.path.isdir(folder) or not os.listdir(folder):
      raise DamagedCheckpoint(f'checkpoint {step} in {mngr.directory} is '
                              f'empty')
    return
  try:
    with open(seal) as f:
      expected = json.load(f)
  except ValueError as e:
    raise DamagedCheckpoint(f'checkpoint {step} in {mngr.directory} has a '
                            f'damaged {CHECKSUM_FILE}') from e
  found = _file_checksums(folder)
  for name in sorted(set(expected) | set(found)):
    if name not in found:
      problem = 'is missing'
    elif name not in expected:
      problem = 'was not there when it was saved'
    elif found[name][0] != expected[name][0]:
      problem = (f'has {found[name][0]} bytes where {expected[name][0]} were '
                 f'saved')
    elif found[name][1] != expected[name][1]:
      problem = 'does not match the checksum saved with it'
    else:
      continue
    raise DamagedCheckpoint(f'checkpoint {step} in {mngr.directory} is '
                            f'damaged: {name} {problem}')


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Move a damaged checkpoint out of Orbax's sight, keeping its bytes."""
  folder = _step_dir(mngr, step)
  target = folder + DAMAGED_SUFFIX
  suffix = 1
  while os.path.exists(target):
    suffix += 1
    target = f'{folder}{DAMAGED_SUFFIX}{suffix}'
  if jax.process_index() == 0:
    os.rename(folder, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  mngr.reload()
  return target


def _check_room(mngr: ocp.CheckpointManager, state) -> None:
  """A clear error before a save that cannot fit on the disk (Orbax's own
  is hundreds of lines from its writer threads)."""
  needed = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state))
  needed = int(needed * 1.05) + (1 << 20)  # Orbax's metadata and chunking
  free = shutil.disk_usage(str(mngr.directory)).free
  if free < needed:
    kept = mngr.latest_step()
    kept = (f'checkpoint {kept} is kept' if kept is not None
            else 'no checkpoint was saved yet')
    raise errors.UserError(
        f'the disk holding {mngr.directory} is full: a checkpoint needs about '
        f'{needed / 1e6:.0f} MB and {free / 1e6:.0f} MB are free; {kept}. '
        f'Free some space, then run the same command to resume')


def save(mngr: ocp.CheckpointManager, state, config,
         eval_metrics: Optional[dict[str, float]] = None) -> None:
  """Start an asynchronous save of `state` at its step.

  eval_metrics, when the state was just evaluated, rank it for 'best'.
  Refuses, naming the step kept, when the disk has no room for it.
  """
  finish(mngr)
  _check_room(mngr, state)
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


def _read(mngr: ocp.CheckpointManager, step: int, what: str, read):
  """read(), with any failure to read checkpoint `step` as DamagedCheckpoint.

  Orbax reports unreadable files in many types (OSError, ValueError,
  TensorStore's errors), none of which the caller can act on differently.
  """
  try:
    return read()
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else (
        type(e).__name__)
    raise DamagedCheckpoint(f'checkpoint {step} in {mngr.directory} is '
                            f'damaged: its {what} cannot be read ({reason})'
                            ) from e


def stored_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The config checkpoint `step` was made with, as JSON."""
  return _read(mngr, step, 'config', lambda: mngr.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)


def check_config(mngr: ocp.CheckpointManager, step: int, config,
                 only: Optional[tuple] = None, ignore: tuple = ()) -> None:
  """Refuse a config that differs from the one checkpoint `step` was made
  with, naming the keys (see config.changes for only and ignore)."""
  stored = stored_config(mngr, step)
  changed = config_lib.changes(stored, config, only=only, ignore=ignore)
  reshaped = [c for c in changed if c.split(':')[0] in config_lib.SHAPE_KEYS]
  if reshaped:   # --allow_config_change cannot help: the shapes differ
    raise CheckpointError(
        f'checkpoint {step} in {mngr.directory} holds another network: '
        f'{"; ".join(reshaped)}. Use the values it was made with')
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
  stored = _shapes(_read(mngr, step, 'metadata',
                         lambda: mngr.item_metadata(step)['state']))
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
  """The state at `step`, shaped and sharded like `abstract_state`, after
  checking its files (raises DamagedCheckpoint)."""
  verify(mngr, step)
  _check_shapes(mngr, step, abstract_state)
  return _read(mngr, step, 'state', lambda: mngr.restore(
      step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))).state)


# The training split's class names in label order, beside config.json: the
# config names the dataset, but a folder or a store at that path can be
# replaced by another whose labels mean other classes.
CLASSES_FILE = 'class_names.json'


def save_class_names(workdir: str, class_names) -> None:
  if jax.process_index() == 0:
    with files.atomic_write(os.path.join(workdir, CLASSES_FILE)) as f:
      json.dump(list(class_names), f)


def check_class_names(workdir: str, class_names, dataset: str) -> None:
  """Refuse data whose labels name other classes than those workdir's
  network was trained on (runs from before the file are not checked).
  Callers pass sources.class_names, from the dataset's metadata, so that
  the refusal comes before any image is read."""
  path = os.path.join(workdir, CLASSES_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    trained = json.load(f)
  here = list(class_names)
  if trained == here:
    return
  label = next(i for i in range(max(len(trained), len(here)))
               if trained[i:i + 1] != here[i:i + 1])
  at = lambda names: repr(names[label]) if label < len(names) else 'none'
  raise errors.DatasetError(
      f'{dataset} does not have the classes the network in {workdir} was '
      f'trained on (label {label}: {at(here)} here, {at(trained)} there): '
      f'use the dataset it was trained on')
