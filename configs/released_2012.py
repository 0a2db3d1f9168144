"""The network and optimiser as the released 2012 cuda-convnet code trained them."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'released_2012'
  config.bias_lr_multiplier = 2.0
  # Run 145's schedule, from the comments of layers/layer-params-145.cfg:
  # the rate divided by 10 at epochs 25, 51 and 79 (lr_boundaries_epochs),
  # conv1's divided once more at 67 and set to 0 at 72, the colour noise off
  # at 67, and the biases left at their starting rate (epsB 0.02) throughout.
  config.lr_schedule = 'piecewise'
  config.lr_boundaries_epochs = (25, 51, 79)
  config.conv1_lr_cut_epoch = 67
  config.conv1_freeze_epoch = 72
  config.bias_lr_follows_schedule = False
  config.dataset.lighting_off_epoch = 67
  config.dataset.lighting_rescale = True
  config.num_epochs = 91
  return config
