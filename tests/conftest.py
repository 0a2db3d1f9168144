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


# The longest files first (CI, 1 December: 520, 270, 190, 190, 180 and 170 s
# of the suite's 2,100 worker-seconds), so that the two workers, each taking
# the next file as it finishes one, end together rather than one of them
# starting a long file near the end.
_LONGEST_FIRST = ('test_checkpoints.py', 'test_multi_process.py',
                  'test_parallel.py', 'test_slurm.py', 'test_main.py',
                  'test_bad_input.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
