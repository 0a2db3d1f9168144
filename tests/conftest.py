"""Shared test setup: 8 fake CPU devices and a tiny built-in dataset."""

import os

import command_line  # imports no JAX, so the settings below still apply

# Before JAX starts: the mesh tests need several devices on one CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX's compilation cache, shared by this process, both workers and every
# command the tests start (they inherit os.environ): most tests compile the
# same tiny steps, and a warm cache halves such a command's time.
# The size limit makes JAX lock the folder (filelock) for concurrent jobs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    command_line.REPO, '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))

import pytest  # pylint: disable=g-import-not-at-top

# The test files, slowest first (as CI's --durations=0 lists them). With
# --no-loadscope-reorder (pyproject.toml) the two workers take whole files in
# this order, so the files still running at the end are short ones and both
# workers finish together; in xdist's own order (most tests first) one
# worker sat idle for minutes at the end. A file not named here runs last.
_SLOWEST_FIRST = (
    'test_checkpoints.py', 'test_multi_process.py', 'test_slurm.py',
    'test_parallel.py', 'test_main.py', 'test_raw_store.py',
    'test_bad_input.py', 'test_models.py', 'test_dataset_tools.py',
    'test_figures.py', 'test_steps.py', 'test_reference_step.py',
    'test_benchmark.py', 'test_input_pipeline.py', 'test_xla_cpu.py',
    'test_augment.py', 'test_optimizer.py', 'test_launch.py',
    'test_huge_pages.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One folder for every test's built-in dataset (made once per settings)."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture
def tiny_config(data_dir):
  """The tests' one tiny config (command_line.TINY): seconds per step."""
  return command_line.tiny_config(data_dir)
