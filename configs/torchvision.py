"""torchvision's AlexNet: one tower, no LRN, dropout before fc6 and fc7."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'torchvision'
  # PyTorch's reference recipe decays every parameter, biases included.
  config.bias_weight_decay = True
  return config
