"""The command line, end to end: train, evaluate, meshes, bad config."""

import gc
import os
import signal

import pytest

from command_line import checkpointed_params
from command_line import metric_records
from command_line import run_main
from command_line import tiny_flags

from alexnet_jax.runtime import interrupts


def test_train_then_eval_reports_the_same_metrics(tmp_path, data_dir):
  """Also the plateau rule in a real run: with min_delta 1 every evaluation
  after the first is a plateau, so with patience 1 the rate is divided after
  the evaluations at steps 2 and 3."""
  workdir = str(tmp_path / 'run')
  train = run_main(*tiny_flags(data_dir), f'--workdir={workdir}',
                   '--config.lr_schedule=plateau',
                   '--config.plateau.patience=1',
                   '--config.plateau.min_delta=1.0',
                   '--config.eval_every_steps=1', '--config.log_every_steps=1')
  assert 'images/sec' in train.stdout and 'ETA' in train.stdout
  # Each evaluation saves (so that the best is kept); the last 3 stay.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '2', '3', '4']
  assert os.listdir(os.path.join(workdir, 'tensorboard', 'train'))
  records = metric_records(workdir)
  rates = {r['step']: r['learning_rate'] for r in records
           if r['split'] == 'train'}
  assert rates == pytest.approx({1: 0.005, 2: 0.005, 3: 5e-4, 4: 5e-5})
  final_eval = [r for r in records if r['split'] == 'eval_1crop'][-1]
  assert final_eval['step'] == 4
  assert {'top1_error', 'top5_error', 'loss'} <= set(final_eval)

  evaluated = run_main(*tiny_flags(data_dir), f'--workdir={workdir}',
                       '--mode=eval', '--config.progress_every_s=0')
  # Progress lines, with stdout going to a pipe (as to a log file).
  assert 'evaluation (1-crop): 30/30 images (100%)' in evaluated.stdout
  restored = metric_records(workdir)[-1]
  assert restored['split'] == 'eval_1crop' and restored['step'] == 4
  for key in ('top1_error', 'top5_error', 'loss'):
    assert restored[key] == pytest.approx(final_eval[key], rel=1e-6)


def test_a_two_by_two_mesh_run_reaches_the_one_device_parameters(
    tmp_path, data_dir):
  """Same seed, same data: data=2 x tower=2 on 4 devices equals 1 device.

  The one-device run also writes a profile of steps 3-4. (A window with an
  evaluation and a save in it, whose Python the trace records call by call,
  took 21 s to write.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flags = tiny_flags(data_dir, eval_batch=8)
  one_run = run_main(*flags, f'--workdir={tmp_path}/one',
                     '--profile_steps=2:4')
  # For TensorBoard's profile plugin and Perfetto.
  assert 'profile of steps 3-4 written to' in one_run.stdout
  traces = [name for _, _, names in os.walk(tmp_path / 'one' / 'profile')
            for name in names]
  assert any(n.endswith('.xplane.pb') for n in traces), traces
  assert any(n.endswith('.trace.json.gz') for n in traces), traces
  mesh_run = run_main(*flags, f'--workdir={tmp_path}/mesh',
                      '--config.mesh.data=2', '--config.mesh.tower=2',
                      devices=4)
  assert 'on mesh data=2, tower=2' in mesh_run.stdout
  one = checkpointed_params(f'{tmp_path}/one', 4)
  mesh = checkpointed_params(f'{tmp_path}/mesh', 4)
  for a, b in zip(jax.tree.leaves(mesh), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(b))))
  earlier = checkpointed_params(f'{tmp_path}/one', 2)
  assert not np.allclose(one['fc8']['kernel'], earlier['fc8']['kernel'])


def test_one_step_of_the_ilsvrc2012_config_checkpoints_60965224_params(
    tmp_path, data_dir):
  workdir = str(tmp_path / 'paper')
  run_main('--config=configs/ilsvrc2012.py', f'--workdir={workdir}',
           '--config.dataset.name=builtin',
           f'--config.dataset.data_dir={data_dir}',
           '--config.dataset.builtin_train_per_class=8',
           '--config.dataset.builtin_eval_per_class=1',
           '--config.num_train_steps=1', '--config.batch_size=8',
           '--config.eval.batch_size=10')
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  count = sum(int(np.prod(np.shape(p)))
              for p in jax.tree.leaves(checkpointed_params(workdir, 1)))
  assert count == 60_965_224


def test_an_unknown_config_key_fails_in_one_clear_line(tmp_path):
  result = run_main('--config=configs/quickstart.py', '--config.batch_sise=8',
                    f'--workdir={tmp_path}/x', check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'batch_sise' in last
  assert "did you mean 'batch_size'?" in last
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'x')


def test_a_bad_config_value_fails_in_one_clear_line(tmp_path):
  result = run_main('--config=configs/quickstart.py',
                    '--config.model.variant=alexnet_v9',
                    f'--workdir={tmp_path}/x', check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: model.variant='alexnet_v9' is not supported")


def test_eval_scores_a_network_on_its_own_training_run_s_data(
    tmp_path, data_dir):
  """The seed makes the built-in dataset: evaluation without it on the
  command line must still score the network on seed 1's images (and the
  images per class of the run), as the run's own last evaluation did; a
  seed given on the command line is honoured and said."""
  workdir = str(tmp_path / 'run')
  run_main(*tiny_flags(data_dir), f'--workdir={workdir}', '--config.seed=1')
  trained = [r for r in metric_records(workdir)
             if r['split'] == 'eval_1crop'][-1]
  assert trained['dataset'] == ('builtin (seed 1, 8 and 3 images per '
                                'class)')
  without_data_flags = [f for f in tiny_flags(data_dir)
                        if '.builtin_' not in f]
  evaluated = run_main(*without_data_flags, f'--workdir={workdir}',
                       '--mode=eval')
  scored = metric_records(workdir)[-1]
  for key in ('top1_error', 'top5_error', 'loss', 'examples', 'dataset',
              'dataset_split'):
    assert scored[key] == trained[key], key
  assert 'not the training run' not in evaluated.stdout

  other = run_main(*tiny_flags(data_dir), f'--workdir={workdir}',
                   '--mode=eval', '--config.seed=0')
  assert (", not the training run's builtin (seed 1, 8 and 3 images per "
          "class):") in other.stdout
  assert metric_records(workdir)[-1]['dataset'] == (
      'builtin (seed 0, 8 and 3 images per class)')


@pytest.mark.parametrize('module', ['alexnet_jax.main',
                                    'alexnet_jax.benchmark'])
def test_help_exits_0_with_one_usage_line_a_line(module):
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from command_line import REPO  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'python -m {module} --config=' in result.stdout
  # A continued usage line stays two lines, not one with a gap in it.
  assert not re.search(r'\S {3,}--mode', result.stdout), result.stdout


def test_the_compute_modules_do_not_import_tensorflow():
  """GPU hosts may have no TensorFlow: the train-step benchmark, the model,
  the steps, checkpoints and the workdir lock must not need it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from command_line import REPO  # pylint: disable=g-import-not-at-top
  modules = ('model.alexnet', 'model.parallel', 'train.steps',
             'train.optimizer', 'train.checkpoints',
             'data.device_preprocessing', 'data.dataset_stats', 'config',
             'train.preemption', 'runtime.distributed', 'runtime.workdir',
             'benchmark.compute', 'benchmark.__main__')
  code = ('import sys\n' + ''.join(f'import alexnet_jax.{m}\n'
                                    for m in modules)
          + 'print(sorted(m for m in sys.modules if m == "tensorflow"))')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip() == '[]'


def test_a_ctrl_c_lost_in_a_garbage_collection_callback_is_still_raised(
    monkeypatch):
  # As a Ctrl-C landing in JAX's callback: the KeyboardInterrupt raised
  # there is reported as ignored, and the program goes on.
  monkeypatch.setattr(interrupts, '_seen', False)
  previous = signal.getsignal(signal.SIGINT)
  raised_in_callback = []

  def callback(phase, info):
    del info
    if phase == 'start' and not raised_in_callback:
      raised_in_callback.append(True)
      signal.raise_signal(signal.SIGINT)

  interrupts.catch()
  monkeypatch.setattr('sys.unraisablehook', lambda unraisable: None)
  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
    signal.signal(signal.SIGINT, previous)
  assert raised_in_callback
  with pytest.raises(KeyboardInterrupt):
    interrupts.raise_if_seen()
