"""A trained network as evaluation, predict, figures and export use it: its
parameters from a checkpoint, its softmax and its fc7 features."""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import config as config_lib
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.model import alexnet
from alexnet_jax.model import parallel
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import xla_cpu
from alexnet_jax.train import checkpoints
from alexnet_jax.train import steps


def with_training_data(config, workdir: str, checkpoint: str,
                       set_on_command_line) -> tuple[Any, str]:
  """config with the data of the checkpoint's training run, and a note.

  A network is scored on the data it was trained on: the keys of
  config.DATA_KEYS (the dataset, the seed that makes the built-in one)
  come from the checkpoint's config, except those set_on_command_line
  names. The note is '' where the data are the training run's, else
  ', not the training run's NAME' for the result lines.
  """
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    stored = checkpoints.stored_config(
        mngr, checkpoints.find_step(mngr, checkpoint))
  except checkpoints.DamagedCheckpoint:
    return config, ''   # restore_params says so, naming the other steps
  data = config_lib.stored_values(stored, config_lib.DATA_KEYS)
  trained = config_lib.with_values(config, data)
  chosen = config_lib.with_values(config, {
      key: value for key, value in data.items()
      if key not in set_on_command_line})
  if config_lib.changes(json.loads(trained.to_json()), chosen,
                        only=config_lib.DATA_KEYS):
    return chosen, f', not the training run\'s {config_lib.data_name(trained)}'
  return chosen, ''


def restore_params(config, mesh, spec: str, allow_config_change: bool):
  """The parameters of 'WORKDIR' or 'WORKDIR@WHICH' (latest, best, a step)."""
  workdir, _, which = spec.partition('@')
  mngr = checkpoints.manager(workdir, read_only=True)
  step = checkpoints.find_step(mngr, which or 'latest')
  try:
    if not allow_config_change:
      checkpoints.check_config(mngr, step, config,
                               only=config_lib.NETWORK_KEYS)
    state = checkpoints.restore(mngr, steps.abstract_train_state(config, mesh),
                                step)
  except checkpoints.DamagedCheckpoint as e:
    others = [s for s in mngr.all_steps() if s != step]
    raise checkpoints.DamagedCheckpoint(
        f'{e}: it is not used. Choose another with --checkpoint=STEP '
        f'(steps there: {others or "none"})') from e
  return state.params, step


def load(mode: str, config, workdir: str, checkpoint: str,
         allow_config_change: bool):
  """(parameters, step, output names) of workdir's checkpoint, for
  --mode=predict, figures or export, which run in one process."""
  if jax.process_count() > 1:
    raise errors.UserError(f'--mode={mode} runs in one process: start it '
                           f'without --coordinator_address or a launcher')
  dataset_classes = sources.class_names(config)
  checkpoints.check_class_names(workdir, dataset_classes, config.dataset.name)
  names = sources.output_names(config, dataset_classes)
  params, step = restore_params(
      config, parallel.make_mesh(config), f'{workdir}@{checkpoint}',
      allow_config_change)
  return params, step, names


def probabilities_fn(config):
  """A compiled (params, uint8 images or crops) -> softmax, on one device."""
  model, mean = alexnet.build(config), device_preprocessing.mean(config)
  return xla_cpu.jit(lambda params, images: steps.mean_probabilities(
      model, (params,), images, mean))


def top5(probabilities: np.ndarray, class_names) -> list[list]:
  """[[class name, probability], ...], the most probable first."""
  best = np.argsort(-probabilities, kind='stable')[:5]
  return [[class_names[i], round(float(probabilities[i]), 6)] for i in best]


def fc7_features(model: alexnet.AlexNet, params, images: jax.Array,
                 mean) -> jax.Array:
  """The network's last hidden layer (fc7 after its ReLU) for uint8 images."""
  _, state = model.apply(
      {'params': params}, device_preprocessing.normalize(images, mean),
      capture_intermediates=lambda module, method: (
          module.name == 'fc7' and method == '__call__'))
  towers = state['intermediates']['fc7']['__call__'][0]
  return jax.nn.relu(jnp.concatenate(towers, axis=-1))
