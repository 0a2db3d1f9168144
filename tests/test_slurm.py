"""launch/slurm.sbatch under a real SLURM: a one-node cluster started here
(tests/slurm/start_cluster.sh), CPU jobs of 2 tasks, the shipped script with
only resources and time changed on the sbatch line, as a user would."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from command_line import REPO
from command_line import assert_bitwise_equal
from command_line import checkpointed_params
from command_line import tiny_flags

# Enough steps that the stop, which the processes agree on a few steps after
# the signal, lands before the end.
STEPS = 60
# Two tasks, one CPU each, no GPU: the overrides a CPU-only cluster needs.
CPU_JOB = ('--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0',
           '--cpus-per-task=1')


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  """SLURM_CONF of a running one-node cluster; stopped afterwards."""
  missing = [b for b in ('slurmctld', 'slurmd', 'munged', 'sbatch')
             if shutil.which(b) is None]
  if missing or os.geteuid() != 0:
    reason = (f'SLURM is not installed here ({", ".join(missing)} missing; '
              f'Debian: apt-get install slurm-wlm munge) or this is not root'
              if missing else 'starting SLURM daemons needs root')
    if os.environ.get('CI'):
      pytest.fail(reason + '; .ci/run installs it')
    pytest.skip(reason)
  folder = str(tmp_path_factory.mktemp('slurm'))
  started = subprocess.run(
      ['bash', os.path.join(REPO, 'tests/slurm/start_cluster.sh'), folder],
      capture_output=True, text=True, timeout=120)
  assert started.returncode == 0, started.stderr
  yield started.stdout.strip()
  subprocess.run(['bash', os.path.join(REPO, 'tests/slurm/stop_cluster.sh'),
                  folder], timeout=60)


def _environment(conf):
  # The jobs run this Python (the test's virtual environment) on CPU.
  return dict(os.environ, SLURM_CONF=conf,
              PATH=f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}',
              XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _sbatch(conf, log, sbatch_options, main_flags) -> str:
  result = subprocess.run(
      ['sbatch', '--parsable', *CPU_JOB, *sbatch_options, f'--output={log}',
       'launch/slurm.sbatch', 'configs/quickstart.py', *main_flags],
      cwd=REPO, env=_environment(conf), capture_output=True, text=True,
      check=True)
  return result.stdout.strip().split(';')[0]


def _job(conf, job_id) -> dict[str, str]:
  shown = subprocess.run(['scontrol', 'show', 'job', job_id],
                         env=_environment(conf), capture_output=True,
                         text=True, check=True).stdout
  return dict(re.findall(r'(\w+)=(\S+)', shown))


def _wait(conf, job_id, timeout_s=420):
  """The job's final record; its states along the way in 'seen'."""
  deadline, seen = time.monotonic() + timeout_s, []
  while True:
    job = _job(conf, job_id)
    state = (job['JobState'], job['Restarts'])
    if not seen or seen[-1] != state:
      seen.append(state)
    if job['JobState'] in ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT',
                           'NODE_FAIL'):
      return job, seen
    assert time.monotonic() < deadline, f'job {job_id}: {seen}'
    time.sleep(1)


def _flags(data_dir, workdir):
  return [f'--workdir={workdir}', *tiny_flags(data_dir)[1:],
          f'--config.num_train_steps={STEPS}', '--config.log_every_steps=4',
          '--config.checkpoint_every_steps=1000',
          '--config.eval_every_steps=1000', '--config.eval.batch_size=8',
          '--heartbeat_timeout_s=20']


def _script_flags(flags):
  """slurm.sbatch takes CONFIG WORKDIR first, then the other flags."""
  workdir = flags[0][len('--workdir='):]
  return [workdir, *flags[1:]]


@pytest.fixture(scope='module')
def uninterrupted(cluster, data_dir, tmp_path_factory):
  """A 2-task job run to the end: its workdir."""
  workdir = tmp_path_factory.mktemp('slurm_run') / 'run'
  log = workdir.parent / 'log'
  job_id = _sbatch(cluster, log, [],
                   _script_flags(_flags(data_dir, workdir)))
  job, seen = _wait(cluster, job_id)
  assert job['JobState'] == 'COMPLETED', (seen, log.read_text()[-3000:])
  assert job['Restarts'] == '0'
  return workdir


def test_a_two_task_job_equals_the_same_run_under_the_local_launcher(
    uninterrupted, data_dir, tmp_path):
  local = subprocess.run(
      [sys.executable, 'launch/local.py', '--processes=2',
       '--devices_per_process=1', '--', '--config=configs/quickstart.py',
       *_flags(data_dir, tmp_path / 'local')], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert local.returncode == 0, local.stderr[-3000:]
  assert_bitwise_equal(checkpointed_params(uninterrupted, STEPS),
                       checkpointed_params(tmp_path / 'local', STEPS))


def test_at_its_time_limit_a_job_saves_requeues_itself_and_completes(
    cluster, uninterrupted, data_dir, tmp_path):
  """The batch script gets USR1 once training is under way, as SLURM sends
  it at the limit: the tasks save and stop, the job requeues itself and
  completes. (SLURM's own timer checks every 30 s or so, so a short limit
  would signal at a random point: the test sends the signal itself.)"""
  log = tmp_path / 'log'
  job_id = _sbatch(cluster, log, ['--time=10', '--signal=B:USR1@120'],
                   _script_flags(_flags(data_dir, tmp_path / 'run')))
  deadline = time.monotonic() + 300
  while not (log.exists() and f'step 4/{STEPS}' in log.read_text()):
    assert time.monotonic() < deadline, 'the job did not reach step 4'
    time.sleep(0.2)
  subprocess.run(['scancel', '--batch', '--signal=USR1', job_id],
                 env=_environment(cluster), check=True)
  job, seen = _wait(cluster, job_id)
  text = log.read_text()
  print(f'job {job_id} (JobState, Restarts): {seen}\n--- its log ---\n{text}')
  assert job['JobState'] == 'COMPLETED', seen
  assert job['Restarts'] == '1', seen
  assert 'slurm.sbatch: stopped; requeueing job' in text
  stopped = re.search(r'stopped at step (\d+) on request', text)
  assert stopped and int(stopped.group(1)) < STEPS, 'the run was not stopped'
  assert_bitwise_equal(checkpointed_params(tmp_path / 'run', STEPS),
                       checkpointed_params(uninterrupted, STEPS))


def test_a_job_whose_processes_fail_ends_failed_once(cluster, data_dir,
                                                     tmp_path):
  log = tmp_path / 'log'
  flags = _flags(data_dir, tmp_path / 'run')
  flags.append(f'--config.dataset.name=folder:{tmp_path}/missing')
  job_id = _sbatch(cluster, log, [], _script_flags(flags))
  job, seen = _wait(cluster, job_id)
  assert job['JobState'] == 'FAILED', seen
  assert job['Restarts'] == '0' and 'requeue' not in log.read_text()
  assert f'error: no folder {tmp_path}/missing/train' in log.read_text()


def _task_pid(index: int) -> int:
  """The pid of the job's task `index` running alexnet_jax.main."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        command = f.read()
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except OSError:
      continue
    if b'alexnet_jax.main' in command and (
        f'SLURM_PROCID={index}'.encode() in environ):
      return int(pid)
  raise AssertionError(f'no task {index} of alexnet_jax.main is running')


def test_a_job_that_loses_a_process_ends_failed_with_the_line_that_says_so(
    cluster, data_dir, tmp_path):
  """Task 1 killed: task 0 ends within the heartbeat timeout (20 s) with
  the line that names it; srun waits for that (--wait), and the job ends
  FAILED, not requeued."""
  log = tmp_path / 'log'
  job_id = _sbatch(cluster, log, [], _script_flags(
      [*_flags(data_dir, tmp_path / 'run'), '--config.num_train_steps=4000']))
  deadline = time.monotonic() + 300
  while not (log.exists() and 'step 4/4000' in log.read_text()):
    assert time.monotonic() < deadline, 'the job did not reach step 4'
    time.sleep(0.2)
  os.kill(_task_pid(1), signal.SIGKILL)
  job, seen = _wait(cluster, job_id)
  text = log.read_text()
  assert job['JobState'] == 'FAILED', (seen, text[-3000:])
  assert job['Restarts'] == '0' and 'requeue' not in text
  assert 'error: process 1 of this job was lost' in text, text[-3000:]
  assert 'Fatal Python error' not in text

