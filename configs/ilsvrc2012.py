"""The paper's recipe on ILSVRC-2012: paper_2012, batch 128, SGD 0.01, 90 epochs."""

from alexnet_jax import config as config_lib


def get_config():
  return config_lib.default()
