"""Several processes on this machine as one job: jax.distributed over gloo."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from command_line import REPO
from command_line import checkpointed_params
from command_line import environment
from command_line import metric_records
from command_line import run_main
from command_line import tiny_flags

MESH_2X2 = ('--config.mesh.data=2', '--config.mesh.tower=2')


def _launch(*args, processes=2, devices_per_process=2):
  return subprocess.run(
      [sys.executable, 'launch/local.py', f'--processes={processes}',
       f'--devices_per_process={devices_per_process}', '--', *args],
      cwd=REPO, env=environment(), capture_output=True, text=True,
      timeout=600)


def test_two_processes_reach_the_parameters_of_one_with_four_devices(
    tmp_path, data_dir):
  """Same mesh (2, 2), same seed, same data stream: 2 processes x 2 devices
  against 1 process x 4 devices. The checkpoint then evaluates in 4
  processes of one device each, a global batch of 4: the 30 examples split
  8, 8, 7, 7, so processes 2 and 3 pad a whole batch, and the metrics must
  still be those of the training run's evaluation."""
  flags = tiny_flags(data_dir, eval_batch=8)
  two = _launch(*flags, f'--workdir={tmp_path}/two', *MESH_2X2)
  assert two.returncode == 0, two.stderr[-3000:]
  # Progress is printed by process 0 only.
  assert '[0] step 4/4' in two.stdout and '[1] step' not in two.stdout
  run_main(*flags, f'--workdir={tmp_path}/one', *MESH_2X2, devices=4)
  for a, b in zip(jax.tree.leaves(checkpointed_params(f'{tmp_path}/two', 4)),
                  jax.tree.leaves(checkpointed_params(f'{tmp_path}/one', 4))):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(b))))

  trained = metric_records(f'{tmp_path}/two')
  assert sum(r['split'] == 'eval_1crop' for r in trained) == 1  # written once
  four = _launch(*flags, f'--workdir={tmp_path}/two', '--mode=eval',
                 '--config.mesh.data=4', '--config.mesh.tower=1',
                 '--config.eval.batch_size=4', processes=4,
                 devices_per_process=1)
  assert four.returncode == 0, four.stderr[-3000:]
  evaluated = metric_records(f'{tmp_path}/two')[-1]
  assert evaluated['split'] == 'eval_1crop' and evaluated['step'] == 4
  assert evaluated['top1_error'] == pytest.approx(
      trained[-1]['top1_error'], rel=1e-5)
  assert evaluated['loss'] == pytest.approx(trained[-1]['loss'], rel=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _two_processes(flags, stderr_dir=None):
  """Processes 0 and 1 of a job, 2 CPU devices each, killed on the way out
  if still running; process 0's stdout is readable, and each one's stderr
  is in stderr_dir/process<I>.txt if given."""
  processes = _start_two_processes(flags, stderr_dir)
  try:
    yield processes
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()


def _start_two_processes(flags, stderr_dir):
  address = f'localhost:{_free_port()}'
  return [subprocess.Popen(
      [sys.executable, '-m', 'alexnet_jax.main', *flags,
       f'--coordinator_address={address}', '--num_processes=2',
       f'--process_id={index}'], cwd=REPO, env=environment(devices=2),
      stdout=subprocess.PIPE if index == 0 else subprocess.DEVNULL,
      stderr=open(os.path.join(stderr_dir, f'process{index}.txt'), 'w')
      if stderr_dir else subprocess.DEVNULL, text=True) for index in (0, 1)]


# What jaxlib and Python print when a process aborts.
_ABORT_DUMP = ('Traceback', 'Fatal Python error', 'Check failure')


def _read_until(process, prefix: str) -> None:
  """Read process 0's output up to a line; the rest is drained unread."""
  for line in process.stdout:
    if line.startswith(prefix):
      threading.Thread(target=process.stdout.read, daemon=True).start()
      return
  raise AssertionError(f'process 0 ended before printing {prefix!r}')


def _long_run_flags(data_dir, workdir):
  return [*tiny_flags(data_dir, eval_batch=8), f'--workdir={workdir}',
          *MESH_2X2, '--config.num_train_steps=400',
          '--config.checkpoint_every_steps=2', '--config.log_every_steps=1',
          '--heartbeat_timeout_s=20']  # JAX's 100 s would slow the tests


def _saved_steps(workdir) -> list[int]:
  folder = workdir / 'checkpoints'
  return sorted(int(step) for step in os.listdir(folder)
                if step.isdigit()) if folder.is_dir() else []


def test_when_a_process_dies_the_other_stops_and_the_job_resumes(
    tmp_path, data_dir):
  """The survivor ends within the heartbeat timeout (20 s here) with one
  line that names the lost process and the step to resume from."""
  flags = _long_run_flags(data_dir, tmp_path)
  with _two_processes(flags, stderr_dir=tmp_path) as processes:
    _read_until(processes[0], 'step 3/')
    deadline = time.monotonic() + 60
    while 2 not in _saved_steps(tmp_path):  # the save finishes in the back
      assert time.monotonic() < deadline, 'step 2 was not saved within 60 s'
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    processes[0].wait(timeout=120)
    waited = time.monotonic() - killed_at
  assert processes[0].returncode == 1
  print(f'process 0 stopped {waited:.1f} s after process 1 was killed')
  assert waited < 20 + 10, f'process 0 took {waited:.0f} s to stop'
  saved = _saved_steps(tmp_path)
  assert saved and saved[-1] >= 2
  stderr = (tmp_path / 'process0.txt').read_text()
  assert not [dump for dump in _ABORT_DUMP if dump in stderr], stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      f'error: process 1 of this job was lost (it stopped, or its host '
      f'did): run the same command to resume from step {saved[-1]} (its '
      f'checkpoint is in {tmp_path / "checkpoints"})')

  resumed = _launch(*flags, '--config.num_train_steps=6')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'from step {saved[-1]}' in resumed.stdout
  assert '[0] step 6/6' in resumed.stdout


def test_processes_that_end_seconds_apart_exit_cleanly(tmp_path, data_dir):
  """Process 1 is held (SIGSTOP) for 5 s as process 0 prints its last
  evaluation, so process 0 reaches the end that much before it: both must
  still shut down and exit 0, with no abort."""
  flags = [*tiny_flags(data_dir, eval_batch=8), f'--workdir={tmp_path}',
           *MESH_2X2, '--heartbeat_timeout_s=20']
  with _two_processes(flags, stderr_dir=tmp_path) as processes:
    _read_until(processes[0], 'step 4 eval_1crop')
    processes[1].send_signal(signal.SIGSTOP)
    time.sleep(5)
    processes[1].send_signal(signal.SIGCONT)
    for process in processes:
      process.wait(timeout=120)
  for index, process in enumerate(processes):
    stderr = (tmp_path / f'process{index}.txt').read_text()
    assert process.returncode == 0, stderr[-3000:]
    assert not [dump for dump in _ABORT_DUMP if dump in stderr], stderr


def test_sigterm_to_every_process_saves_one_step_and_stops_them_all(
    tmp_path, data_dir):
  """As a scheduler preempts a job: JAX's preemption sync point picks one
  step at which every process saves and stops."""
  # No evaluation before the end either (each one saves): the processes agree
  # on their stopping step a few steps after the signal, which can be past
  # the first epoch's end at step 5.
  flags = [*_long_run_flags(data_dir, tmp_path),
           '--config.checkpoint_every_steps=1000',
           '--config.eval_every_steps=0']
  with _two_processes(flags) as processes:
    _read_until(processes[0], 'step 3/')
    for process in processes:
      process.send_signal(signal.SIGTERM)
    for process in processes:
      process.wait(timeout=120)
  assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2
  (saved,) = _saved_steps(tmp_path)
  assert 3 <= saved < 400


def test_prepare_and_stats_split_the_work_and_match_one_process(
    tmp_path, data_dir):
  flags = [*tiny_flags(data_dir), '--config.dataset.stats_examples=0']
  run_main(*flags, '--mode=stats', f'--workdir={tmp_path}/one')
  two = _launch(*flags, '--mode=stats', f'--workdir={tmp_path}/two',
                devices_per_process=1)
  assert two.returncode == 0, two.stderr[-3000:]
  assert '[0] statistics of 80 images saved to' in two.stdout
  assert '[1] statistics' not in two.stdout
  one_process = np.load(f'{tmp_path}/one/dataset_stats.npz')
  two_processes = np.load(f'{tmp_path}/two/dataset_stats.npz')
  for key in one_process:
    np.testing.assert_allclose(two_processes[key], one_process[key],
                               rtol=1e-5, atol=1e-5)

  copy = tmp_path / 'copy'
  prepared = _launch(*flags, '--mode=prepare', f'--workdir={copy}',
                     devices_per_process=1)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  with open(copy / 'manifest.json') as f:
    assert json.load(f)['images'] == {'train': 80, 'validation': 30}
  assert sum(len(files) for _, _, files in os.walk(copy / 'train')) == 80

  # The raw store: each process writes its own block of rows.
  stores = {}
  for name, launch in (('one', lambda *a: run_main(*a)),
                       ('two', lambda *a: _launch(*a, devices_per_process=1))):
    stores[name] = tmp_path / f'store_{name}'
    made = launch(*flags, '--mode=prepare', '--config.dataset.format=raw',
                  f'--workdir={stores[name]}')
    assert made.returncode == 0, made.stderr[-3000:]
  assert '[1] prepare' not in made.stdout
  for split in ('train', 'validation'):
    for array in ('images.npy', 'labels.npy'):
      np.testing.assert_array_equal(np.load(stores['one'] / split / array),
                                    np.load(stores['two'] / split / array))
