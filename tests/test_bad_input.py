"""Bad input and faults from the command line: one `error:` line, a non-zero
exit, and the workdir and the data exactly as they were."""

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from command_line import REPO
from command_line import environment
from command_line import run_main
from command_line import tiny_flags
import fake_imagenet


def tree_checksums(*folders) -> dict[str, str]:
  """Every file and folder under `folders`, with its bytes' SHA-256."""
  sums = {}
  for folder in folders:
    for root, dirs, files in os.walk(folder):
      for name in dirs:
        sums[os.path.join(root, name)] = 'folder'
      for name in files:
        path = os.path.join(root, name)
        if os.path.islink(path) and not os.path.exists(path):
          sums[path] = 'link to ' + os.readlink(path)
          continue
        with open(path, 'rb') as f:
          sums[path] = hashlib.sha256(f.read()).hexdigest()
  return sums


def assert_one_error_line(result, *expected):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), (
      result.stderr[-3000:])
  for text in expected:
    assert text in lines[0], lines[0]


def _python(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=environment(),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A tiny trained workdir (checkpoints 2 and 4) and its data folder."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  run_main(*tiny_flags(data_dir), f'--workdir={workdir}')
  return workdir


def _config_file(folder, name, text):
  path = os.path.join(folder, name)
  with open(path, 'w') as f:
    f.write(text)
  return path


def test_each_bad_input_is_one_line_and_changes_nothing(
    tmp_path, data_dir, trained):
  """Each case from the command line, two at a time."""
  tiny = tiny_flags(data_dir)
  main = ['-m', 'alexnet_jax.main']
  configs = str(tmp_path / 'configs')
  os.makedirs(configs)
  a_file = _config_file(configs, 'not_a_folder', '')
  new = str(tmp_path / 'new')   # must still not exist afterwards
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(trained, damaged)
  os.makedirs(os.path.join(damaged, 'checkpoints', '9'))  # an empty step
  corrupt = str(tmp_path / 'corrupt')
  shutil.copytree(trained, corrupt)
  data_file = next(
      os.path.join(root, name) for root, _, names in
      os.walk(os.path.join(corrupt, 'checkpoints', '4', 'state'))
      for name in names if os.path.basename(root) == 'd')
  with open(data_file, 'r+b') as f:
    f.seek(8)
    f.write(b'\0' * 64)
  manual = fake_imagenet.write(str(tmp_path / 'manual'))
  with open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'r+b') as f:
    f.truncate(3000)
  imagenet = ['--config.dataset.name=imagenet2012',
              f'--config.dataset.data_dir={tmp_path}/tfds',
              '--config.model.num_classes=1000']
  builtin = os.path.join(data_dir, next(
      d for d in os.listdir(data_dir) if d.startswith('builtin_')))

  # Config values, checked when the config is read: override -> the error.
  bad_values = {
      'batch_size=0': 'batch_size=0', 'batch_size=-4': 'batch_size=-4',
      'log_every_steps=0': 'log_every_steps=0',
      'eval.batch_size=0': 'eval.batch_size=0',
      'keep_checkpoints=-1': 'keep_checkpoints=-1',
      'learning_rate=nan': 'learning_rate=nan',
      'learning_rate=-0.1': 'learning_rate=-0.1',
      'eval_every_steps=-2': 'eval_every_steps=-2',
      'dtype=float16': 'use --config.dtype=bfloat16',
      'progress_every_s=-1': 'progress_every_s=-1',
      'conv1_lr_cut_epoch=-2': 'conv1_lr_cut_epoch=-2',
  }
  cases = {
      **{value: ([*main, *tiny, f'--config.{value}', f'--workdir={new}'],
                 expected) for value, expected in bad_values.items()},
      'figure pool 0': ([*main, *tiny, '--mode=figures', '--figure_pool=0',
                         f'--workdir={trained}'], '--figure_pool=0'),
      'parameters past memory': (
          [*main, '--config=configs/ilsvrc2012.py', '--config.image_size=4000',
           '--config.resize_size=4000', '--config.dataset.name=builtin',
           f'--config.dataset.data_dir={data_dir}',
           '--config.dataset.builtin_train_per_class=8',
           '--config.dataset.builtin_eval_per_class=3',
           f'--workdir={new}'], 'GB of parameters'),
      # Config files.
      'config raises': ([*main, '--config=' + _config_file(
          configs, 'raises.py', 'raise RuntimeError("boom")\n'),
                         f'--workdir={new}'], 'raises.py fails to load'),
      'config import': ([*main, '--config=' + _config_file(
          configs, 'imports.py', 'import no_such_module\n'),
                         f'--workdir={new}'], 'no_such_module'),
      'config syntax': ([*main, '--config=' + _config_file(
          configs, 'syntax.py', 'def get_config(:\n'),
                         f'--workdir={new}'], 'SyntaxError'),
      'config no get_config': ([*main, '--config=' + _config_file(
          configs, 'empty.py', 'x = 1\n'), f'--workdir={new}'],
                               'has no get_config()'),
      'config dict': ([*main, '--config=' + _config_file(
          configs, 'dict.py', 'def get_config():\n  return {}\n'),
                       f'--workdir={new}'], 'returns a dict'),
      'config a folder': ([*main, f'--config={configs}', f'--workdir={new}'],
                          'is a folder: give a config file'),
      'config not python': ([*main, '--config=README.md', f'--workdir={new}'],
                            'is not a Python config file'),
      'config key misspelt': ([*main, *tiny, '--config.batchsize=64',
                               f'--workdir={new}'],
                              "no config key 'batchsize': did you mean "
                              "'batch_size'?"),
      # Workdirs.
      'workdir a file': ([*main, *tiny, f'--workdir={a_file}'],
                         'is a file'),
      'workdir empty': ([*main, *tiny, '--workdir='], '--workdir is empty'),
      # Checkpoints.
      'eval empty step folder': ([*main, *tiny, '--mode=eval',
                                  f'--workdir={damaged}'],
                                 'checkpoint 9', 'damaged'),
      'eval corrupted bytes': ([*main, *tiny, '--mode=eval',
                                f'--workdir={corrupt}'],
                               'checkpoint 4', 'damaged'),
      'predict corrupted bytes': ([*main, *tiny, '--mode=predict',
                                   f'--images={builtin}/validation',
                                   f'--workdir={corrupt}'],
                                  'checkpoint 4', 'damaged'),
      'ensemble member missing': ([*main, *tiny, '--mode=eval',
                                   f'--ensemble={tmp_path}/nope',
                                   f'--workdir={trained}'],
                                  f'no checkpoint in {tmp_path}/nope',
                                  'give the workdir of a training run'),
      'steps below the checkpoint': ([*main, *tiny,
                                      '--config.num_train_steps=3',
                                      f'--workdir={trained}'],
                                     'past num_train_steps=3'),
      'export dir a file': ([*main, *tiny, '--mode=export',
                             f'--export_dir={a_file}',
                             f'--workdir={trained}'], '--export_dir'),
      # Datasets.
      'prepare into its source': (
          [*main, *tiny, f'--config.dataset.name=folder:{builtin}',
           '--mode=prepare', f'--workdir={builtin}/copy'],
          'inside the dataset'),
      'tfds needs a download': (
          [*main, *tiny, '--config.dataset.name=mnist',
           f'--config.dataset.data_dir={tmp_path}/tfds', f'--workdir={new}'],
          'mnist is not prepared'),
      'imagenet without archives': (
          [*main, *tiny, *imagenet, f'--workdir={new}'],
          'ILSVRC2012_img_train.tar'),
      'imagenet truncated archive': (
          [*main, *tiny, *imagenet, f'--config.dataset.manual_dir={manual}',
           f'--workdir={new}'], 'ILSVRC2012_img_val.tar is damaged'),
      'imagenet truncated archive, prepare': (
          [*main, *tiny, *imagenet, f'--config.dataset.manual_dir={manual}',
           '--mode=prepare', f'--workdir={new}'],
          'ILSVRC2012_img_val.tar is damaged'),
      # Tools.
      'benchmark unknown key': ([*['-m', 'alexnet_jax.benchmark'],
                                 '--config=configs/quickstart.py',
                                 '--config.batch_sise=8'], 'batch_sise'),
      'benchmark repeats 0': ([*['-m', 'alexnet_jax.benchmark'],
                               '--config=configs/quickstart.py',
                               '--repeats=0'], '--repeats=0'),
      'benchmark steps 0': ([*['-m', 'alexnet_jax.benchmark'],
                             '--config=configs/quickstart.py', '--steps=0'],
                            '--steps=0'),
      'benchmark photos abc': ([*['-m', 'alexnet_jax.benchmark'],
                                '--config=configs/quickstart.py',
                                '--photos=abc'], 'WIDTHxHEIGHT'),
      'launch 0 devices': (['launch/local.py', '--devices_per_process=0',
                            '--', *tiny, f'--workdir={new}'],
                           '--devices_per_process=0'),
      'launch 0 processes': (['launch/local.py', '--processes=0', '--',
                              *tiny, f'--workdir={new}'], '--processes=0'),
  }
  before = tree_checksums(trained, damaged, corrupt, data_dir, manual)
  def run(numbered_case):
    # Each case its own new workdir: two at once on one would meet the lock.
    index, (args, *_) = numbered_case
    return _python(*[a.replace(new, f'{new}{index}') for a in args])

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(cases, pool.map(run, enumerate(cases.values()))))
  failures = []
  for name, (_, *expected) in cases.items():
    try:
      assert_one_error_line(results[name], *expected)
    except AssertionError as e:
      failures.append(f'{name}: {e}')
  assert not failures, '\n\n'.join(failures)
  assert not [d for d in os.listdir(tmp_path) if d.startswith('new')]
  after = tree_checksums(trained, damaged, corrupt, data_dir, manual)
  changed = sorted(k for k in set(before) | set(after)
                   if before.get(k) != after.get(k))
  assert not changed, changed


@pytest.fixture
def mounts():
  """Mounts a test makes as root (a read-only view, a tiny disk); unmounted
  afterwards."""
  made = []

  def mount(*args):
    target = args[-1]
    os.makedirs(target, exist_ok=True)
    result = subprocess.run(['mount', *args], capture_output=True, text=True)
    if result.returncode:
      reason = f'cannot mount here ({result.stderr.strip()}): needs root'
      if os.environ.get('CI'):
        pytest.fail(reason)
      pytest.skip(reason)
    made.append(target)
    return target

  yield mount
  for target in reversed(made):
    subprocess.run(['umount', target], check=False)


def test_a_read_only_workdir_is_refused_before_any_work(
    tmp_path, data_dir, trained, mounts):
  view = mounts('--bind', '-o', 'ro', trained, str(tmp_path / 'ro'))
  before = tree_checksums(trained)
  tiny = tiny_flags(data_dir)
  resume = run_main(*tiny, '--config.num_train_steps=6', f'--workdir={view}',
                    check=False)
  assert_one_error_line(resume, 'cannot write in --workdir', 'Read-only')
  assert 'step 5' not in resume.stdout   # nothing was trained
  evaluation = run_main(*tiny, '--mode=eval', f'--workdir={view}',
                        check=False)
  assert_one_error_line(evaluation, 'cannot write in --workdir')
  assert 'eval' not in evaluation.stdout  # refused before computing
  assert tree_checksums(trained) == before


def test_a_full_disk_is_named_with_the_space_a_checkpoint_needs(
    tmp_path, data_dir, mounts):
  disk = mounts('-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(tmp_path / 'disk'))
  result = run_main(*tiny_flags(data_dir), f'--workdir={disk}/run',
                    check=False)
  assert_one_error_line(result, 'is full: a checkpoint needs about',
                        'no checkpoint was saved yet')
