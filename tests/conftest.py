"""Shared test setup: 8 fake CPU devices and a tiny built-in dataset."""

import os

# Before JAX starts: the mesh tests need several devices on one CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One folder for every test's built-in dataset (made once per settings)."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture
def tiny_config(data_dir):
  """A small paper_2012 on a small built-in dataset: seconds per step."""
  c = config_lib.default()
  c.dataset.name = 'builtin'
  c.dataset.data_dir = data_dir
  c.dataset.builtin_train_per_class = 8
  c.dataset.builtin_eval_per_class = 3
  c.dataset.shuffle_buffer = 100
  c.model.num_classes = 10
  c.model.width = 0.125
  c.image_size = 64
  c.resize_size = 72
  c.batch_size = 16
  c.eval.batch_size = 7     # does not divide the 30 eval examples
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 4
  c.mesh.data = 1           # one device unless a test asks for a mesh
  return c
