"""Checkpoints: resume after any stop, evaluate any checkpoint on any mesh,
ensembles, and bad input that is refused without changing the workdir."""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest

from alexnet_jax import config as config_lib
from alexnet_jax.model import parallel
from alexnet_jax.runtime import errors
from alexnet_jax.train import checkpoints
from alexnet_jax.train import steps
from command_line import assert_bitwise_equal
from command_line import checkpointed_params
from command_line import metric_records
from command_line import run_main
from command_line import start_main
from command_line import tiny_flags

STEPS = 4  # tiny_flags' num_train_steps


@pytest.fixture(scope='module')
def flags(data_dir):
  return tiny_flags(data_dir, eval_batch=8)


@pytest.fixture
def flags_config(tiny_config):
  """The config `flags` give, for a job run in this process."""
  tiny_config.eval.batch_size = 8
  return tiny_config


@pytest.fixture(scope='module')
def uninterrupted(flags, tmp_path_factory):
  """The workdir of a run of 4 steps, never stopped (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_main(*flags, f'--workdir={workdir}')
  return workdir


@pytest.fixture(scope='module')
def mesh_trained(flags, tmp_path_factory):
  """A run trained on mesh data=2, tower=2, evaluated at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('mesh_trained')
  run_main(*flags, f'--workdir={workdir}', '--config.mesh.data=2',
           '--config.mesh.tower=2', '--config.eval_every_steps=2', devices=4)
  return workdir


def _snapshot(path) -> dict[str, tuple[int, int]]:
  """Every file and folder under path, with its size and modification time."""
  found = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), path)] = (
          stat.st_size, stat.st_mtime_ns)
  return found


def _last_line(result) -> str:
  return result.stderr.strip().splitlines()[-1]


def _read_until(process, prefix: str) -> None:
  for line in process.stdout:
    if line.startswith(prefix):
      return
  raise AssertionError(f'the run ended before printing {prefix!r}: '
                       f'{process.stderr.read()[-2000:]}')


def test_stopping_and_resuming_gives_bitwise_the_uninterrupted_run(
    tmp_path, flags, uninterrupted):
  """Same command again on the workdir: it continues from step 2 with the
  same examples, crops and dropout as if it had never stopped."""
  run_main(*flags, f'--workdir={tmp_path}', '--config.num_train_steps=2')
  resumed = run_main(*flags, f'--workdir={tmp_path}')
  assert 'from step 2' in resumed.stdout
  assert_bitwise_equal(checkpointed_params(tmp_path, STEPS),
                       checkpointed_params(uninterrupted, STEPS))


def test_sigkill_during_a_save_then_resume_gives_the_uninterrupted_run(
    tmp_path, flags, uninterrupted):
  """Killed while step 3's checkpoint is half written: Orbax never renamed
  it into place, so the run resumes from step 2."""
  run = start_main(*flags, f'--workdir={tmp_path}',
                   '--config.checkpoint_every_steps=1')
  folder = tmp_path / 'checkpoints'
  def saving_step_3():
    return folder.is_dir() and any(
        name.startswith('3.') for name in os.listdir(folder))
  deadline = time.time() + 300
  while not saving_step_3():
    assert run.poll() is None, 'the run ended before it saved step 3'
    assert time.time() < deadline, 'no save of step 3 within 300 s'
    time.sleep(0.0005)
  run.send_signal(signal.SIGKILL)
  run.communicate()
  assert run.returncode == -signal.SIGKILL
  assert saving_step_3(), 'the save finished before the kill landed'
  assert '3' not in os.listdir(folder)

  resumed = run_main(*flags, f'--workdir={tmp_path}',
                     '--config.checkpoint_every_steps=1')
  assert 'from step 2' in resumed.stdout
  assert not saving_step_3()  # the half-written one was cleared away
  assert_bitwise_equal(checkpointed_params(tmp_path, STEPS),
                       checkpointed_params(uninterrupted, STEPS))


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_run(
    tmp_path, flags, uninterrupted):
  """The moment is printed, so pytest shows it with any failure; rerun
  that moment with KILL_SEED=its seed."""
  seed = int(os.environ.get('KILL_SEED', random.randrange(1 << 30)))
  rng = random.Random(seed)
  after_step, delay = rng.randint(1, STEPS - 1), rng.uniform(0, 0.3)
  moment = f'seed {seed}: {delay:.3f} s after step {after_step}'
  print(f'killed {delay:.3f} s after step {after_step} (KILL_SEED={seed})')
  run = start_main(*flags, f'--workdir={tmp_path}',
                   '--config.checkpoint_every_steps=1',
                   '--config.log_every_steps=1')
  _read_until(run, f'step {after_step}/{STEPS}')
  time.sleep(delay)
  run.send_signal(signal.SIGKILL)
  run.communicate()
  assert run.returncode == -signal.SIGKILL, f'the run finished first ({moment})'

  run_main(*flags, f'--workdir={tmp_path}')
  assert_bitwise_equal(checkpointed_params(tmp_path, STEPS),
                       checkpointed_params(uninterrupted, STEPS))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_the_run_resumes_from_it(
    tmp_path, flags, uninterrupted, signum):
  """The step finishes and is saved; one line, and the exit status the
  signal would have given (143, or 130 for Ctrl-C)."""
  run = start_main(*flags, f'--workdir={tmp_path}',
                   '--config.checkpoint_every_steps=100',
                   '--config.log_every_steps=1')
  _read_until(run, f'step 1/{STEPS}')
  run.send_signal(signum)
  _, stderr = run.communicate(timeout=300)
  assert run.returncode == 128 + signum, stderr[-2000:]
  assert 'Traceback' not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('stopped at step ') and 'run the same command' in last
  stopped_at = int(last.split()[3].rstrip(';'))
  assert stopped_at < STEPS
  assert os.listdir(tmp_path / 'checkpoints') == [str(stopped_at)]
  with open(tmp_path / 'config.json') as f:   # written before the first step
    assert json.load(f)['num_train_steps'] == STEPS

  resumed = run_main(*flags, f'--workdir={tmp_path}')
  assert f'from step {stopped_at}' in resumed.stdout
  assert_bitwise_equal(checkpointed_params(tmp_path, STEPS),
                       checkpointed_params(uninterrupted, STEPS))


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, flags):
  run_main(*flags, f'--workdir={tmp_path}', '--config.num_train_steps=2')
  before = _snapshot(tmp_path / 'checkpoints')
  result = run_main(*flags, f'--workdir={tmp_path}',
                    '--config.learning_rate=1e30', '--allow_config_change',
                    check=False)
  assert result.returncode == 1
  last = _last_line(result)
  assert last.startswith('error: the ') and 'by step 4' in last
  assert 'non-finite' in last or 'loss became' in last
  assert 'the last good checkpoint, step 2, is kept' in last
  assert _snapshot(tmp_path / 'checkpoints') == before


def _evaluate(config, workdir, checkpoint='latest', **overrides) -> dict:
  """evaluate.run in this process, as --mode=eval runs it: the record it
  adds to workdir's metrics."""
  from alexnet_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(overrides)
  evaluate.run(config, str(workdir), checkpoint=checkpoint)
  return metric_records(workdir)[-1]


@pytest.mark.parametrize('crops', [1, 10])
def test_eval_gives_the_same_metrics_on_one_device_and_on_a_2x2_mesh(
    mesh_trained, flags_config, crops):
  """Trained on data=2 x tower=2; evaluated there and on one device."""
  one_device, two_by_two = (
      _evaluate(flags_config, mesh_trained, **{
          'eval.crops': crops, 'mesh.data': data, 'mesh.tower': tower})
      for data, tower in ((1, 1), (2, 2)))
  assert one_device['split'] == f'eval_{crops}crop'
  assert one_device['step'] == STEPS and one_device['examples'] == 30
  for key in ('loss', 'top1_error', 'top5_error', 'examples'):
    assert one_device[key] == pytest.approx(two_by_two[key], rel=1e-5)


def test_an_ensemble_of_two_checkpoints_from_the_command_line(
    mesh_trained, flags, flags_config):
  members = []
  for step in (2, 4):
    members.append(_evaluate(flags_config, mesh_trained, checkpoint=str(step)))
    assert members[-1]['step'] == step
  result = run_main(*flags, f'--workdir={mesh_trained}', '--mode=eval',
                    '--checkpoint=2', f'--ensemble={mesh_trained}@4')
  assert f'ensemble of {mesh_trained}@2, {mesh_trained}@4' in result.stdout
  ensemble = metric_records(mesh_trained)[-1]
  assert ensemble['split'] == 'ensemble2_1crop' and ensemble['step'] == 2
  assert ensemble['examples'] == 30
  # The cross-entropy of the mean softmax is at most the members' mean
  # (it is convex), and equal only if the members agree everywhere.
  member_losses = [m['loss'] for m in members]
  assert ensemble['loss'] < np.mean(member_losses)
  assert all(ensemble['loss'] != loss for loss in member_losses)


def test_best_is_the_lowest_eval_error_and_is_kept_beside_the_latest(
    tmp_path, tiny_config):
  mesh = parallel.make_mesh(tiny_config)
  state = steps.create_sharded_train_state(tiny_config, mesh)
  mngr = checkpoints.manager(str(tmp_path), keep=1)
  for step, error in ((1, 0.5), (2, 0.2), (3, None), (4, 0.7)):
    metrics = None if error is None else {'top1_error': error}
    checkpoints.save(mngr, state.replace(step=step), tiny_config, metrics)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [2, 4]
  reopened = checkpoints.manager(str(tmp_path), read_only=True)
  assert checkpoints.find_step(reopened, 'best') == 2
  assert checkpoints.find_step(reopened, 'latest') == 4


def test_config_changes_names_each_key_and_skips_the_ignored_ones():
  stored = json.loads(config_lib.default().to_json())
  now = config_lib.default()
  now.batch_size, now.mesh.data, now.model.width = 256, 4, 0.5
  assert config_lib.changes(stored, now) == [
      'batch_size: 128 -> 256', 'mesh.data: -1 -> 4', 'model.width: 1.0 -> 0.5']
  assert config_lib.changes(stored, now,
                            ignore=config_lib.MAY_CHANGE_ON_RESUME) == [
                                'batch_size: 128 -> 256',
                                'model.width: 1.0 -> 0.5']
  assert config_lib.changes(stored, now, only=config_lib.NETWORK_KEYS) == [
      'model.width: 1.0 -> 0.5']


# Each case: the mode main would run, config overrides, its arguments, and
# what the error names.
BAD_INPUT = {
    'resume with another batch size': (
        'train', {'batch_size': 32}, {}, 'batch_size: 16 -> 32'),
    'eval with another variant': (
        'eval', {'model.variant': 'one_tower_2014'}, {},
        'model.variant: paper_2012 -> one_tower_2014'),
    'eval with another class count': (
        'eval', {'model.num_classes': 20}, {}, 'model.num_classes: 10 -> 20'),
    'eval of a checkpoint that does not fit, change allowed': (
        'eval', {'model.num_classes': 20}, {'allow_config_change': True},
        'params/fc8/bias is (10,) there and (20,) here'),
    'eval of a step that is not there': (
        'eval', {}, {'checkpoint': '3'}, 'no checkpoint 3'),
    'eval of a misspelt checkpoint': (
        'eval', {}, {'checkpoint': 'bset'},
        '--checkpoint=bset: use latest, best or a step number'),
}


@pytest.mark.parametrize('case', BAD_INPUT)
def test_bad_input_is_refused_and_changes_nothing(
    case, uninterrupted, flags_config):
  """In this process, through the function main runs for the mode (the
  command line turns such an error into its one line and exit status 1, as
  the tests of test_bad_input.py see)."""
  from alexnet_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  from alexnet_jax.train import trainer  # pylint: disable=g-import-not-at-top
  mode, overrides, kwargs, message = BAD_INPUT[case]
  flags_config.update_from_flattened_dict(overrides)
  job = {'train': trainer.train_and_evaluate, 'eval': evaluate.run}[mode]
  before = _snapshot(uninterrupted)
  with pytest.raises(errors.UserError) as refused:
    job(flags_config, str(uninterrupted), **kwargs)
  assert message in str(refused.value)
  assert _snapshot(uninterrupted) == before


@pytest.mark.parametrize('key, value, shape', [
    ('model.width', 0.25, True), ('resize_size', 80, False)])
def test_allow_config_change_is_offered_only_where_it_can_work(
    key, value, shape, uninterrupted, flags_config):
  """Another width cannot restore whatever the flags say; another resize
  size can, with --allow_config_change."""
  from alexnet_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  flags_config.update_from_flattened_dict({key: value})
  with pytest.raises(errors.UserError) as refused:
    evaluate.run(flags_config, str(uninterrupted))
  assert f'{key}: ' in str(refused.value)
  assert ('--allow_config_change' in str(refused.value)) != shape


@pytest.mark.parametrize('exists', [False, True])
def test_eval_of_a_missing_or_empty_workdir_fails_and_creates_nothing(
    tmp_path, flags, exists):
  workdir = tmp_path / 'never_trained'
  if exists:
    workdir.mkdir()
  result = run_main(*flags, '--mode=eval', f'--workdir={workdir}',
                    check=False)
  assert result.returncode == 1
  assert _last_line(result).startswith('error: no checkpoint in ')
  assert 'Traceback' not in result.stderr
  assert os.path.exists(workdir) == exists
  assert not exists or not os.listdir(workdir)


def test_a_second_job_on_the_workdir_is_refused_and_a_dead_ones_lock_is_taken(
    tmp_path, flags):
  # Killed long before it could finish or save anything (its steps take
  # milliseconds, and the second job's start-up seconds).
  first = start_main(*flags, f'--workdir={tmp_path}',
                     '--config.num_train_steps=1000000',
                     '--config.log_every_steps=1',
                     '--config.checkpoint_every_steps=1000000',
                     '--config.eval_every_steps=1000000')
  try:
    _read_until(first, 'step 1/')
    second = run_main(*flags, f'--workdir={tmp_path}',
                      '--config.learning_rate=0.001', check=False)
    assert second.returncode == 1
    assert _last_line(second).startswith('error: ')
    assert 'in use by another job (host ' in _last_line(second)
    assert f'pid {first.pid}' in _last_line(second)
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  # The kill left the lock file; the holder is dead, so it is taken over.
  assert os.path.exists(tmp_path / 'job.lock')
  third = run_main(*flags, f'--workdir={tmp_path}',
                   '--config.num_train_steps=2')
  assert 'taking over the lock of a job that is no longer running' in (
      third.stderr)
  assert f'pid {first.pid}' in third.stderr
  assert not os.path.exists(tmp_path / 'job.lock')  # released at the end


def test_ctrl_c_twice_exits_at_once_and_leaves_no_lock(tmp_path, flags):
  """The second Ctrl-C exits with os._exit, which runs no `finally`: the
  lock is released before it all the same."""
  run = start_main(*flags, f'--workdir={tmp_path}',
                   '--config.num_train_steps=1000000',
                   '--config.log_every_steps=1',
                   '--config.checkpoint_every_steps=1000000',
                   '--config.eval_every_steps=1000000')
  _read_until(run, 'step 1/')
  while run.poll() is None:   # until one lands while the first is handled
    run.send_signal(signal.SIGINT)
    time.sleep(0.02)
  _, stderr = run.communicate(timeout=300)
  assert run.returncode == 130, stderr[-2000:]
  assert 'interrupted again: exiting without saving' in stderr
  assert not os.path.exists(tmp_path / 'job.lock')


def test_a_checkpoints_folder_with_nothing_saved_is_removed(tmp_path):
  """What a run stopped while it starts up (before its first save) leaves."""
  mngr = checkpoints.manager(str(tmp_path))
  assert os.listdir(tmp_path) == ['checkpoints']
  checkpoints.remove_if_empty(mngr)
  assert not os.listdir(tmp_path)


def test_a_corrupted_checkpoint_is_set_aside_and_training_resumes_before_it(
    tmp_path, flags, uninterrupted):
  """64 bytes overwritten in step 4's parameters: eval refuses step 4, and
  training resumes from step 2 to the uninterrupted run's parameters."""
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)
  data = workdir / 'checkpoints' / '4' / 'state' / 'ocdbt.process_0' / 'd'
  victim = max(data.iterdir(), key=lambda p: p.stat().st_size)
  with open(victim, 'r+b') as f:
    f.seek(victim.stat().st_size // 2)
    f.write(b'\0' * 64)

  refused = run_main(*flags, f'--workdir={workdir}', '--mode=eval',
                     check=False)
  assert refused.returncode == 1
  assert _last_line(refused).startswith('error: checkpoint 4 in ')
  assert 'damaged' in _last_line(refused)

  resumed = run_main(*flags, f'--workdir={workdir}',
                     '--config.num_train_steps=4')
  assert 'checkpoint 4' in resumed.stderr and 'damaged' in resumed.stderr
  assert 'from step 2' in resumed.stdout
  assert (workdir / 'checkpoints' / '4.damaged').is_dir()  # kept to look at
  assert_bitwise_equal(checkpointed_params(workdir, STEPS),
                       checkpointed_params(uninterrupted, STEPS))
  # The points logged after step 2 by the first run are marked, not lost.
  records = metric_records(workdir)
  replayed = [r for r in records if r.get('replayed')]
  assert replayed and all(r['step'] > 2 for r in replayed)
  assert [r['step'] for r in records
          if r['split'] == 'train' and not r.get('replayed')] == [2, 4]
