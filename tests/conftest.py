"""Shared test setup: 8 fake CPU devices and a tiny built-in dataset."""

import os

import command_line  # imports no JAX, so the settings below still apply

# Before JAX starts: the mesh tests need several devices on one CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX's compilation cache, shared by this process, both workers and every
# command the tests start (they inherit os.environ): most tests compile the
# same tiny steps, and a command with a warm cache took 12 s against 26.
# The size limit makes JAX lock the folder (filelock) for concurrent jobs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    command_line.REPO, '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One folder for every test's built-in dataset (made once per settings)."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture
def tiny_config(data_dir):
  """The tests' one tiny config (command_line.TINY): seconds per step."""
  return command_line.tiny_config(data_dir)
