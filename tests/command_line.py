"""Running `python -m alexnet_jax.main` in tests, on a tiny model and dataset."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(devices: int = 1) -> dict[str, str]:
  return dict(os.environ,
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def run_main(*args, check=True, devices=1) -> subprocess.CompletedProcess:
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO,
      env=environment(devices), capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(result.stderr[-3000:])
  return result


def start_main(*args, devices=1) -> subprocess.Popen:
  """The command in the background, its stdout readable line by line."""
  return subprocess.Popen(
      [sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO,
      env=environment(devices), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


# The tiny setting of every test, in-process or on the command line: the
# quickstart at width 0.125 on 80 training and 30 evaluation images, 4 steps
# of 16, so both kinds of test run the same network, with the paper's dropout
# (which the quickstart leaves out), evaluated once an epoch on the centre
# crop alone (the quickstart's 10 crops would make every evaluation ten times
# the work; the tests that are about the 10 crops ask for them).
TINY = {
    'model.dropout_rate': 0.5,
    'dataset.builtin_train_per_class': 8,
    'dataset.builtin_eval_per_class': 3,
    'model.width': 0.125,
    'batch_size': 16,
    'num_train_steps': 4,
    'log_every_steps': 2,
    'checkpoint_every_steps': 2,
    'eval.batch_size': 7,   # does not divide the 30 evaluation images
    'eval.crops': 1,
    'eval_every_steps': -1,
}


def tiny_config(data_dir):
  """TINY as a config, on one device (in-process tests see 8 fake ones)."""
  import configs.quickstart  # pylint: disable=g-import-not-at-top
  config = configs.quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.update_from_flattened_dict(TINY)
  config.mesh.data = 1
  return config


def tiny_flags(data_dir, eval_batch=7):
  """TINY as command-line flags."""
  return ['--config=configs/quickstart.py',
          f'--config.dataset.data_dir={data_dir}',
          *(f'--config.{key}={value}' for key, value in TINY.items()
            if key != 'eval.batch_size'),
          f'--config.eval.batch_size={eval_batch}']


def metric_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def checkpointed_params(workdir, step):
  """The parameters of a checkpoint as numpy arrays, whatever devices or
  processes wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=as_numpy)['params']


def assert_bitwise_equal(params, other):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(params) == jax.tree.structure(other)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)
