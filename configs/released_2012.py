"""The network and optimiser as the released 2012 cuda-convnet code trained them."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'released_2012'
  config.bias_lr_multiplier = 2.0
  # The released run divided the learning rate at about these epochs.
  config.lr_schedule = 'piecewise'
  return config
