r"""alexnet_jax: train AlexNet, and evaluate, predict with, draw and export it.

  python -m alexnet_jax.main --config=configs/ilsvrc2012.py --workdir=DIR
  python -m alexnet_jax.main --config=configs/quickstart.py --workdir=DIR \
      --mode=eval [--checkpoint=best] [--ensemble=DIR2,DIR3@best]
  python -m alexnet_jax.main --config=configs/ilsvrc2012.py --workdir=COPY \
      --mode=prepare     # a 256-px copy to train from (folder:COPY)
  python -m alexnet_jax.main --config=configs/ilsvrc2012.py --workdir=DIR \
      --mode=stats       # the training set's mean and colour PCA
  python -m alexnet_jax.main --config=configs/quickstart.py --workdir=DIR \
      --mode=predict --images=FILE_OR_FOLDER,...   # top 5, one JSON line each
  python -m alexnet_jax.main --config=configs/quickstart.py --workdir=DIR \
      --mode=figures     # Figures 3 and 4 of the paper in DIR/figures
  python -m alexnet_jax.main --config=configs/quickstart.py --workdir=DIR \
      --mode=export      # a TensorFlow SavedModel in DIR/saved_model

Override any config key with --config.KEY=VALUE (e.g. --config.batch_size=256).
"""

# Run as a program, restart with huge pages before importing anything
# large (huge_pages.py says why).
if __name__ == '__main__':
  from alexnet_jax.runtime import huge_pages
  huge_pages.restart_with_huge_pages()

import errno
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from alexnet_jax import config as config_lib
from alexnet_jax.runtime import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Folder for checkpoints, logs and metrics.')
_MODE = flags.DEFINE_enum(
    'mode', 'train',
    ['train', 'eval', 'prepare', 'stats', 'predict', 'figures', 'export'],
    'train (or resume); eval the latest checkpoint; prepare a 256-px copy of '
    'the dataset in workdir; stats: the dataset\'s mean and PCA to workdir; '
    'predict: the top 5 of --images; figures: the paper\'s Figures 3 and 4 '
    'to workdir/figures; export: a TensorFlow SavedModel.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'latest',
    '--mode=eval, predict, figures, export: which checkpoint of workdir: '
    'latest, best (lowest eval top-1 error) or a step number.')
_IMAGES = flags.DEFINE_list(
    'images', [], '--mode=predict: image files or folders, comma-separated.')
_FIGURE_POOL = flags.DEFINE_integer(
    'figure_pool', 10000, '--mode=figures: training images searched for the '
    'nearest neighbours in fc7 space.')
_EXPORT_DIR = flags.DEFINE_string(
    'export_dir', '', '--mode=export: where to write the SavedModel '
    '(default: workdir/saved_model).')
_ENSEMBLE = flags.DEFINE_list(
    'ensemble', [],
    '--mode=eval: more networks to average with workdir\'s, as WORKDIR or '
    'WORKDIR@CHECKPOINT, comma-separated.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume or evaluate a workdir with a config that differs from the one '
    'its checkpoint was made with.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Join other processes with jax.distributed: auto (when given '
    '--coordinator_address or started by SLURM / Open MPI), on (always, for '
    'Cloud TPU pods and clusters JAX detects) or off.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for a multi-process '
    'run that no scheduler set up (see launch/).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index, 0 to num_processes-1.')
_PROFILE_STEPS = flags.DEFINE_string(
    'profile_steps', '', 'START:END: write a jax.profiler trace of the train '
    'steps after START up to END to workdir/profile (TensorBoard\'s profile '
    'plugin, or Perfetto for the .trace.json.gz).')
flags.register_validator(
    'profile_steps',
    lambda v: not v or (v.count(':') == 1 and all(
        p.isdigit() for p in v.split(':')) and int(v.split(':')[0]) < int(
            v.split(':')[1])),
    message='--profile_steps takes START:END, two step numbers with START < '
    'END, e.g. 10:15')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_s', 100,
    'Multi-process runs: how long a silent process is waited for before the '
    'others stop (JAX\'s default).', lower_bound=1)
flags.mark_flags_as_required(['config', 'workdir'])


# Modes that write checkpoints or a dataset: one job at a time per workdir.
_LOCKING_MODES = ('train', 'prepare', 'stats')
# Modes that read a checkpoint of the workdir.
_CHECKPOINT_MODES = ('eval', 'predict', 'figures', 'export')


def _check_flags(mode: str, workdir: str) -> str:
  """Refuses flags that do not fit the mode, and a workdir that cannot be
  used, before TensorFlow and JAX take their seconds to load. Returns the
  workdir as an absolute path."""
  from alexnet_jax.runtime import workdir as workdir_lib
  if mode != 'eval' and _ENSEMBLE.value:
    raise errors.UserError('--ensemble is for --mode=eval')
  if mode in _LOCKING_MODES and _CHECKPOINT.present:
    raise errors.UserError(f'--checkpoint is not for --mode={mode}: use it '
                           f'with eval, predict, figures or export')
  if mode == 'predict' and not _IMAGES.value:
    raise errors.UserError('--mode=predict needs --images=FILE_OR_FOLDER,...')
  if mode != 'figures' and _FIGURE_POOL.present:
    raise errors.UserError('--figure_pool is for --mode=figures')
  if _FIGURE_POOL.value <= 0:
    raise errors.UserError(f'--figure_pool={_FIGURE_POOL.value}: give a '
                           f'number of training images above 0')
  if mode == 'export' and _EXPORT_DIR.value:
    workdir_lib.check(_EXPORT_DIR.value, flag='--export_dir')
  return workdir_lib.check(workdir, writable=mode != 'predict')


def _run(mode: str, config, workdir: str) -> None:
  # Imported here so that --help and flag errors stay fast.
  from alexnet_jax.data import dataset_tools
  from alexnet_jax.runtime import console
  from alexnet_jax.runtime import workdir as workdir_lib
  from alexnet_jax.tools import evaluate
  from alexnet_jax.tools import export
  from alexnet_jax.tools import figures
  from alexnet_jax.tools import inference
  from alexnet_jax.tools import predict
  from alexnet_jax.train import trainer
  if mode == 'prepare':
    dataset_tools.check_output(config, workdir)
  data_note = ''
  if mode in _CHECKPOINT_MODES:
    config, data_note = inference.with_training_data(
        config, workdir, _CHECKPOINT.value,
        set_on_command_line=config_flags.get_override_values(
            flags.FLAGS['config']))
    if data_note and mode != 'eval':   # eval says so in its result line
      console.warning(f'--mode={mode} on {config_lib.data_name(config)}'
                      f'{data_note}')
  jobs = {
      'train': lambda: trainer.train_and_evaluate(
          config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
          profile_steps=tuple(map(int, _PROFILE_STEPS.value.split(':')))
          if _PROFILE_STEPS.value else None,
          eval_images=figures.tensorboard_images),
      'eval': lambda: evaluate.run(
          config, workdir, checkpoint=_CHECKPOINT.value,
          ensemble=tuple(_ENSEMBLE.value),
          allow_config_change=_ALLOW_CONFIG_CHANGE.value,
          data_note=data_note),
      'prepare': lambda: dataset_tools.prepare(config, workdir),
      'stats': lambda: dataset_tools.stats(config, workdir),
      'predict': lambda: predict.run(
          config, workdir, _CHECKPOINT.value, _IMAGES.value,
          _ALLOW_CONFIG_CHANGE.value),
      'figures': lambda: figures.run(
          config, workdir, _CHECKPOINT.value, _FIGURE_POOL.value,
          _ALLOW_CONFIG_CHANGE.value),
      'export': lambda: export.run(
          config, workdir, _CHECKPOINT.value, _EXPORT_DIR.value,
          _ALLOW_CONFIG_CHANGE.value),
  }
  if mode in _LOCKING_MODES:
    with workdir_lib.locked(workdir):
      jobs[mode]()
  else:
    jobs[mode]()


def main(argv):
  from alexnet_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  try:
    _main(argv)
  except SystemExit as e:
    distributed.end(e.code)
    raise
  distributed.end(0)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from alexnet_jax.runtime import console  # pylint: disable=g-import-not-at-top
  console.quiet_library_logs()
  from alexnet_jax.data import builtin_data  # pylint: disable=g-import-not-at-top
  from alexnet_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from alexnet_jax.runtime import interrupts  # pylint: disable=g-import-not-at-top
  from alexnet_jax.train import preemption  # pylint: disable=g-import-not-at-top
  from alexnet_jax.runtime import tf_runtime  # pylint: disable=g-import-not-at-top
  interrupts.catch()
  try:
    workdir = _check_flags(_MODE.value, _WORKDIR.value)
    if _MODE.value == 'train' and _CONFIG.value.dataset.name == 'builtin':
      # Made meanwhile in other processes: TensorFlow and JAX load on one.
      builtin_data.start(*builtin_data.settings(_CONFIG.value))
    tf_runtime.start()
    interrupts.raise_if_seen()
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value,
                           _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _HEARTBEAT_TIMEOUT.value)
    _run(_MODE.value, _CONFIG.value, workdir)
    distributed.leave(together=True)
  except errors.UserError as e:
    distributed.leave()
    errors.exit_with_error(str(e), 1)
  except preemption.Stopped as e:   # every process stopped at this step
    distributed.leave(together=True)
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    distributed.leave()
    errors.exit_with_error('interrupted before training started or after it '
                           'ended: nothing more was saved', 130)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    distributed.leave()
    errors.exit_with_error(f'the disk is full ({e.filename or e}): free some '
                           f'space, then run the same command again', 1)
  except Exception as e:  # pylint: disable=broad-except
    if distributed.is_collective_failure(e):
      distributed.wait_for_the_watch(e)   # one line naming the lost process
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
