"""The SLURM script and Kubernetes manifest pass what a multi-process run
needs (they cannot run here: this checks what they would start)."""

import os
import re
import stat
import subprocess
import sys

import yaml

from alexnet_jax.runtime import distributed
from command_line import REPO


def _sbatch_options(path):
  with open(path) as f:
    return dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', f.read(), re.M))


def test_the_slurm_script_runs_main_once_per_gpu_with_the_users_flags(
    tmp_path):
  fake_srun = tmp_path / 'srun'
  fake_srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
  fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}',
             SRUN_ARGS=str(tmp_path / 'args'))
  subprocess.run(['bash', 'launch/slurm.sbatch', 'configs/ilsvrc2012.py',
                  '/shared/runs/a', '--config.batch_size=1024'],
                 cwd=REPO, env=env, check=True)
  assert (tmp_path / 'args').read_text().split('\n')[:-1] == [
      '--kill-on-bad-exit=0', '--wait=130', 'python', '-m', 'alexnet_jax.main',
      '--config=configs/ilsvrc2012.py', '--workdir=/shared/runs/a',
      '--config.batch_size=1024']
  options = _sbatch_options(os.path.join(REPO, 'launch/slurm.sbatch'))
  assert options['ntasks-per-node'] == options['gpus-per-node'] == '8'
  assert options['signal'].startswith('B:USR1@')  # to the batch script
  usage = subprocess.run(['bash', 'launch/slurm.sbatch'], cwd=REPO, env=env,
                         capture_output=True, text=True)
  assert usage.returncode != 0 and 'usage: sbatch' in usage.stderr


def test_slurm_tasks_make_main_join_a_distributed_job(monkeypatch):
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.launched_by_scheduler()
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not distributed.launched_by_scheduler()
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.launched_by_scheduler()


def test_the_kubernetes_job_gives_each_pod_its_process_and_process_0s_address():
  with open(os.path.join(REPO, 'launch/kubernetes.yaml')) as f:
    service, job = yaml.safe_load_all(f)
  assert service['kind'] == 'Service' and job['kind'] == 'Job'
  assert service['spec']['clusterIP'] == 'None'  # headless: pod DNS names
  name = job['metadata']['name']
  assert service['spec']['selector'] == {'job-name': name}
  spec = job['spec']
  assert spec['completionMode'] == 'Indexed'
  pod = spec['template']['spec']
  assert pod['subdomain'] == service['metadata']['name']
  (container,) = pod['containers']
  assert container['command'] == ['python', '-m', 'alexnet_jax.main']
  args = dict(a.lstrip('-').split('=', 1) for a in container['args'])
  assert args['num_processes'] == str(spec['completions']) == str(
      spec['parallelism'])
  assert args['process_id'] == '$(JOB_COMPLETION_INDEX)'
  host, port = args['coordinator_address'].split(':')
  assert host == f'{name}-0.{pod["subdomain"]}'
  assert int(port) == container['ports'][0]['containerPort']
  helpfull = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', '--helpfull'], cwd=REPO,
      capture_output=True, text=True).stdout
  for flag in args:
    assert f'--{flag.split(".")[0]}:' in helpfull, flag
