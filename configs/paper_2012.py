"""The network the paper describes (two towers); the same as ilsvrc2012.py."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'paper_2012'
  return config
