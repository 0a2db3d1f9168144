"""ilsvrc2012.py under the variant's name, so that each variant has a
config file of its name."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'paper_2012'
  return config
