"""One tower, as in "One weird trick..." (2014, cuda-convnet2 layers-imagenet-1gpu)."""

from alexnet_jax import config as config_lib


def get_config():
  config = config_lib.default()
  config.model.variant = 'one_tower_2014'
  # The paper's hybrid: with --config.mesh.tower=N the fully connected layers
  # are split over N devices; with the default mesh.tower=1 this is plain
  # data parallelism.
  config.mesh.fc_model_parallel = True
  return config
