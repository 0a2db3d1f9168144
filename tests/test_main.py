"""The command line, end to end: train, checkpoint, eval, bad input."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, check=True, devices=1):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(result.stderr[-3000:])
  return result


def _tiny_flags(data_dir, eval_batch=7):
  return ['--config=configs/quickstart.py',
          f'--config.dataset.data_dir={data_dir}',
          '--config.dataset.builtin_train_per_class=8',
          '--config.dataset.builtin_eval_per_class=3',
          '--config.model.width=0.125', '--config.batch_size=16',
          '--config.num_train_steps=4', '--config.log_every_steps=2',
          '--config.checkpoint_every_steps=2',
          f'--config.eval.batch_size={eval_batch}']


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_train_then_eval_reports_the_same_metrics(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train = _main(*_tiny_flags(data_dir), f'--workdir={workdir}')
  assert 'images/sec' in train.stdout and 'ETA' in train.stdout
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert os.listdir(os.path.join(workdir, 'tensorboard', 'train'))
  records = _records(workdir)
  final_eval = [r for r in records if r['split'] == 'eval'][-1]
  assert final_eval['step'] == 4
  assert {'top1_error', 'top5_error', 'loss'} <= set(final_eval)

  _main(*_tiny_flags(data_dir), f'--workdir={workdir}', '--mode=eval')
  restored = _records(workdir)[-1]
  assert restored['split'] == 'eval_1crop' and restored['step'] == 4
  for key in ('top1_error', 'top5_error', 'loss'):
    assert restored[key] == pytest.approx(final_eval[key], rel=1e-6)


def _checkpointed_params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)['params']


def test_a_two_by_two_mesh_run_reaches_the_one_device_parameters(
    tmp_path, data_dir):
  """Same seed, same data: data=2 x tower=2 on 4 devices equals 1 device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flags = _tiny_flags(data_dir, eval_batch=8)
  _main(*flags, f'--workdir={tmp_path}/one')
  mesh_run = _main(*flags, f'--workdir={tmp_path}/mesh', '--config.mesh.data=2',
                   '--config.mesh.tower=2', devices=4)
  assert 'on mesh data=2, tower=2' in mesh_run.stdout
  one = _checkpointed_params(f'{tmp_path}/one', 4)
  mesh = _checkpointed_params(f'{tmp_path}/mesh', 4)
  for a, b in zip(jax.tree.leaves(mesh), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(b))))
  earlier = _checkpointed_params(f'{tmp_path}/one', 2)
  assert not np.allclose(one['fc8']['kernel'], earlier['fc8']['kernel'])


def test_stopping_and_resuming_gives_bitwise_the_uninterrupted_run(
    tmp_path, data_dir):
  """Same command again on the workdir: it continues from step 2 with the
  same examples, crops and dropout as if it had never stopped."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flags = _tiny_flags(data_dir, eval_batch=8)
  _main(*flags, f'--workdir={tmp_path}/whole')
  _main(*flags, f'--workdir={tmp_path}/resumed', '--config.num_train_steps=2')
  resumed = _main(*flags, f'--workdir={tmp_path}/resumed')
  assert 'from step 2' in resumed.stdout
  whole = _checkpointed_params(f'{tmp_path}/whole', 4)
  again = _checkpointed_params(f'{tmp_path}/resumed', 4)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_one_step_of_the_ilsvrc2012_config_checkpoints_60965224_params(
    tmp_path, data_dir):
  workdir = str(tmp_path / 'paper')
  _main('--config=configs/ilsvrc2012.py', f'--workdir={workdir}',
        '--config.dataset.name=builtin', f'--config.dataset.data_dir={data_dir}',
        '--config.dataset.builtin_train_per_class=8',
        '--config.dataset.builtin_eval_per_class=1',
        '--config.num_train_steps=1', '--config.batch_size=8',
        '--config.eval.batch_size=10')
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  count = sum(int(np.prod(np.shape(p)))
              for p in jax.tree.leaves(_checkpointed_params(workdir, 1)))
  assert count == 60_965_224


def test_an_unknown_config_key_fails_in_one_clear_line(tmp_path):
  result = _main('--config=configs/quickstart.py', '--config.batch_sise=8',
                 f'--workdir={tmp_path}/x', check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'batch_sise' in last
  assert 'Did you mean "batch_size"' in last
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'x')


def test_a_bad_config_value_fails_in_one_clear_line(tmp_path):
  result = _main('--config=configs/quickstart.py',
                 '--config.model.variant=alexnet_v9',
                 f'--workdir={tmp_path}/x', check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: model.variant='alexnet_v9' is not supported")


def test_eval_without_a_checkpoint_fails_in_one_clear_line(tmp_path):
  result = _main('--config=configs/quickstart.py', '--mode=eval',
                 f'--workdir={tmp_path}/never_trained', check=False)
  assert result.returncode == 1
  assert 'no checkpoint' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'never_trained')
