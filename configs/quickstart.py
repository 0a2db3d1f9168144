"""The paper's two-tower network, narrowed, on the built-in dataset: minutes on a CPU."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.dataset.name = 'builtin'
  config.model.num_classes = 10
  config.model.width = 0.25
  config.image_size = 64
  config.resize_size = 73
  config.batch_size = 64
  config.eval.batch_size = 250
  config.num_epochs = 10
  config.lr_schedule = 'piecewise'
  config.lr_boundaries_epochs = (7,)
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
