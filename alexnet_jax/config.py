"""The full set of configuration keys, with the paper's recipe as defaults.

Config files in configs/ start from `default()` and change a few fields, so
every run has every key and a mistyped override fails at once.
"""

import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Optional

import ml_collections

from alexnet_jax.runtime import errors

# The released 2012 code's per-channel ImageNet mean and RGB PCA (0-255 units).
IMAGENET_MEAN_RGB = (127.3, 119.7, 104.9)
IMAGENET_PCA_EIGVALS = (121.78, 37.09, 19.72)      # sqrt of eigenvalues: s
IMAGENET_PCA_EIGVECS = ((-0.5635, -0.7126, 0.4180),  # rows: R, G, B;
                        (-0.5762, -0.0235, -0.8170),  # columns: eigenvectors
                        (-0.5920, 0.7012, 0.3973))


def default() -> ml_collections.ConfigDict:
  """AlexNet trained as in the paper on ILSVRC-2012."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'          # compute dtype; parameters stay float32
  c.image_size = 224           # the network's input
  c.resize_size = 256          # shorter side, then a centre square

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'paper_2012'
  c.model.num_classes = 1000
  c.model.width = 1.0          # multiplies every layer's width
  c.model.dropout_rate = 0.5
  # The initial bias of conv2, conv4, conv5, fc6 and fc7 (paper: 1). Caffe's
  # bvlc_alexnet uses 0.1; narrow nets on few classes need it (see quickstart).
  c.model.positive_bias = 1.0
  # Two towers on one device: one grouped convolution (feature_group_count=2)
  # for conv2, conv4 and conv5 instead of one per tower. The same network;
  # on CPU the separate convolutions are faster (docs/design.md).
  c.model.grouped_convolutions = False

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'imagenet2012'  # builtin, a TFDS name, or folder:PATH
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.mean = 'per_channel'   # or 'per_pixel' (needs stats_file)
  c.dataset.mean_rgb = IMAGENET_MEAN_RGB
  c.dataset.pca_eigvals = IMAGENET_PCA_EIGVALS
  c.dataset.pca_eigvecs = IMAGENET_PCA_EIGVECS
  c.dataset.lighting_std = 0.1     # alpha ~ N(0, 0.1) per image
  c.dataset.lighting_off_epoch = -1.0  # no lighting from this epoch; -1 never
  # The released code divided each noisy crop by 1 + lighting_std, "so that
  # the overall scale of the training data doesn't become too different from
  # the test data".
  c.dataset.lighting_rescale = False
  # --mode=stats output; when set, its mean and PCA replace the three above.
  c.dataset.stats_file = ml_collections.FieldReference(None, field_type=str)
  c.dataset.stats_examples = 50000  # --mode=stats: images sampled (0: all)
  c.dataset.shuffle_buffer = 16384
  # Decode each image once to its 256x256 (resize_size) square and keep them
  # all in memory: for datasets that fit (sources.decoded_in_memory).
  c.dataset.decoded_in_memory = False
  # --mode=prepare writes 'jpeg' (the 256-px copy) or 'raw' (the 256x256
  # squares as pixels, data/raw_store.py); read either with folder:PATH.
  c.dataset.format = 'jpeg'
  # The input rate the run is planned for: a raw store larger than the free
  # memory is said so, with the disk bandwidth this rate needs.
  c.dataset.planned_images_per_sec = 45000
  c.dataset.builtin_train_per_class = 600
  c.dataset.builtin_eval_per_class = 100

  c.batch_size = 128               # global, over all devices and hosts
  c.num_epochs = 90
  c.num_train_steps = -1           # -1: from num_epochs

  c.learning_rate = 0.01
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.bias_lr_multiplier = 1.0
  c.bias_weight_decay = False      # the released code's (docs/fidelity.md)
  c.lr_schedule = 'plateau'        # or 'piecewise'
  c.lr_factor = 0.1
  c.warmup_epochs = 0.0            # linear warm-up; the paper has none
  c.lr_boundaries_epochs = (25, 51, 79)  # the released run's divisions
  # The released run's exceptions (configs/released_2012.py); epochs, -1 never.
  c.bias_lr_follows_schedule = True  # False: biases keep their starting rate
  c.conv1_lr_cut_epoch = -1.0        # conv1's rate divided once more
  c.conv1_freeze_epoch = -1.0        # conv1's rate 0 from here
  c.plateau = ml_collections.ConfigDict()
  c.plateau.patience = 3           # evaluations without improvement
  c.plateau.max_reductions = 3
  c.plateau.min_delta = 0.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all remaining devices
  c.mesh.tower = 1
  # The 2014 hybrid ("One weird trick", one-tower variants): convolutions
  # data-parallel over every device, fc6-fc8 split by output unit over the
  # mesh.tower devices of each group.
  c.mesh.fc_model_parallel = False

  c.eval = ml_collections.ConfigDict()
  c.eval.crops = 1                 # 1: centre crop; 10: corners, centre, mirrors
  c.eval.batch_size = 128

  c.log_every_steps = 100
  c.progress_every_s = 30.0        # prepare, stats and evaluation progress
  # Intervals in steps, both read one way: N > 0 every N steps, -1 once an
  # epoch, 0 only at the end. A run also evaluates and saves at its end.
  c.eval_every_steps = -1
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  return c


# Keys a resumed run may change: they do not change what training computes.
MAY_CHANGE_ON_RESUME = (
    'mesh', 'model.grouped_convolutions', 'eval.batch_size', 'num_epochs',
    'num_train_steps', 'log_every_steps', 'progress_every_s',
    'checkpoint_every_steps', 'keep_checkpoints',
    'dataset.data_dir', 'dataset.manual_dir', 'dataset.stats_examples',
    'dataset.format', 'dataset.planned_images_per_sec')
# Keys that define a trained network and the input it expects: evaluation
# must use the values it was trained with.
NETWORK_KEYS = (
    'model.variant', 'model.width', 'model.num_classes', 'image_size',
    'resize_size', 'dataset.mean', 'dataset.mean_rgb', 'dataset.stats_file')


# Keys that change the shapes of the network's parameters: a checkpoint can
# only be restored with the values it was made with.
SHAPE_KEYS = ('model.variant', 'model.width', 'model.num_classes',
              'image_size')
# Keys that say which data a network was trained on (the seed makes the
# built-in dataset). Evaluation, predict, figures and export take them from
# the checkpoint's config unless the command line sets them.
DATA_KEYS = (
    'dataset.name', 'dataset.train_split', 'dataset.eval_split',
    'dataset.builtin_train_per_class', 'dataset.builtin_eval_per_class',
    'seed')


def data_name(config) -> str:
  """The dataset as results name it: 'builtin (seed 1)' (with its images
  per class where not the default), 'folder:PATH' or a TFDS name."""
  name, dataset = config.dataset.name, config.dataset
  if name != 'builtin':
    return name
  sizes = (dataset.builtin_train_per_class, dataset.builtin_eval_per_class)
  defaults = default().dataset
  if sizes == (defaults.builtin_train_per_class,
               defaults.builtin_eval_per_class):
    return f'{name} (seed {config.seed})'
  return (f'{name} (seed {config.seed}, {sizes[0]} and {sizes[1]} '
          f'images per class)')


def cache_root(config) -> str:
  """Where the built-in dataset and the screening results are kept."""
  return config.dataset.data_dir or os.path.join(
      os.path.expanduser('~'), '.cache', 'alexnet_jax')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _under(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p + '.') for p in prefixes)


def with_values(config, values: dict[str, Any]):
  """A copy of config with the dotted keys of `values` set."""
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def stored_values(stored: dict[str, Any], keys) -> dict[str, Any]:
  """The values of the dotted `keys` in a config kept as JSON."""
  flat = _flatten(stored)
  return {key: flat[key] for key in keys if key in flat}


def changes(stored: dict[str, Any], config, only: Optional[tuple] = None,
            ignore: tuple = ()) -> list[str]:
  """'key: stored -> now' for each key where `config` differs from `stored`.

  stored is a config as JSON (as checkpoints keep it); only and ignore are
  dotted keys or prefixes ('mesh' covers mesh.data and mesh.tower).
  """
  before = _flatten(stored)
  now = _flatten(json.loads(config.to_json()))
  differing = []
  for key in sorted(set(before) | set(now)):
    if (only is not None and not _under(key, only)) or _under(key, ignore):
      continue
    if before.get(key, '(absent)') != now.get(key, '(absent)'):
      differing.append(f'{key}: {before.get(key, "(absent)")} -> '
                       f'{now.get(key, "(absent)")}')
  return differing


def _config_file_problem(path: str) -> Optional[str]:
  """What is wrong with the config file itself, or None if it loads."""
  path = path.split(':')[0] if not os.path.exists(path) else path
  if os.path.isdir(path):
    return (f'--config={path} is a folder: give a config file, e.g. '
            f'configs/quickstart.py')
  if not os.path.isfile(path):
    return f'--config={path}: no such file'
  if not path.endswith('.py'):
    return (f'--config={path} is not a Python config file: give one with '
            f'get_config(), e.g. configs/quickstart.py')
  try:
    spec = importlib.util.spec_from_file_location('_checked_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    where = (f' (line {e.lineno})' if isinstance(e, SyntaxError) and e.lineno
             else '')
    return (f'config file {path} fails to load{where}: '
            f'{type(e).__name__}: {e}')
  if not callable(getattr(module, 'get_config', None)):
    return (f'config file {path} has no get_config(): define one that '
            f'returns a ConfigDict (see configs/)')
  try:
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    return f'config file {path}: get_config() fails: {type(e).__name__}: {e}'
  if not isinstance(config, ml_collections.ConfigDict):
    return (f'config file {path}: get_config() returns a '
            f'{type(config).__name__}, not a ConfigDict: start from '
            f'alexnet_jax.config.default() as configs/ do')
  missing = sorted(set(_flatten(default().to_dict()))
                   - set(_flatten(config.to_dict())))
  if missing:
    return (f'config file {path} lacks keys {", ".join(missing[:5])}: start '
            f'from alexnet_jax.config.default() as configs/ do')
  return None


def _config_path(argv: list[str]) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


_HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags with --config loaded and validated, for main and benchmark.

  A bad flag, config file, override or value becomes a one-line error (exit
  status 2) before anything is written.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    remaining = flags.FLAGS(argv)
    if flags.FLAGS['config'].present:
      validate(flags.FLAGS['config'].value)  # loading is lazy: force it here
    return remaining
  except SystemExit as e:   # absl exits 1 after printing --help's text
    asked = any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:])
    sys.exit(0 if asked else e.code)
  except Exception as e:  # pylint: disable=broad-except
    path = _config_path(argv)
    message = _config_file_problem(path) if path else None
    if message is None and isinstance(e, (flags.Error, errors.UserError)):
      message = str(e)
    elif message is None:
      # An override; ml_collections quotes its messages twice.
      text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
      text = text.replace("\\'", '').replace('\\n', ' ').strip('\'')
      unknown = re.match(r'(\S+) Did you mean "([^"]+)"', text)
      message = (f'no config key {unknown[1]!r}: did you mean '
                 f'{unknown[2]!r}?' if unknown else
                 f'bad --config.KEY=VALUE override: {text}')
  errors.exit_with_error(message, 2)


def _get(config, key: str):
  for part in key.split('.'):
    config = getattr(config, part)
  return config


def _check_range(config, keys: tuple[str, ...], low: float, high: float,
                 low_allowed: bool, what: str) -> None:
  for key in keys:
    value = _get(config, key)
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and (low <= value if low_allowed else low < value)
            and value < high):
      raise errors.UserError(f'{key}={value} must be {what}')


def validate(config) -> None:
  """Reject values no part of the program can use, naming the key to fix."""
  from alexnet_jax.model import alexnet  # pylint: disable=g-import-not-at-top
  choices = {
      'model.variant': (config.model.variant, tuple(alexnet.VARIANTS)),
      'lr_schedule': (config.lr_schedule, ('plateau', 'piecewise')),
      'eval.crops': (config.eval.crops, (1, 10)),
      'dataset.mean': (config.dataset.mean, ('per_channel', 'per_pixel')),
      'dataset.format': (config.dataset.format, ('jpeg', 'raw')),
      'dtype': (config.dtype, ('float32', 'bfloat16')),
  }
  if config.dtype == 'float16':
    raise errors.UserError(
        'dtype=float16 would need loss scaling, which this program does not '
        'do (its gradients underflow): use --config.dtype=bfloat16')
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise errors.UserError(
          f'{key}={value!r} is not supported: use one of '
          f'{", ".join(map(repr, allowed))}')
  stats_file = config.dataset.stats_file
  if stats_file and not os.path.isfile(stats_file):
    raise errors.UserError(f'dataset.stats_file {stats_file} does not exist: '
                           f'make it with --mode=stats')
  if config.dataset.mean == 'per_pixel' and not stats_file:
    raise errors.UserError('dataset.mean=per_pixel needs the mean image: run '
                           '--mode=stats and set --config.dataset.stats_file')
  _check_range(config, ('batch_size', 'eval.batch_size', 'log_every_steps',
                         'keep_checkpoints', 'learning_rate', 'model.width',
                         'model.num_classes', 'resize_size',
                         'plateau.patience'),
               0, math.inf, False, 'a number above 0')
  _check_range(config, ('momentum', 'model.dropout_rate'), 0, 1, True,
               'at least 0 and below 1')
  _check_range(config, ('weight_decay', 'warmup_epochs',
                         'dataset.lighting_std', 'progress_every_s'),
               0, math.inf, True, 'a number of 0 or more')
  for key in ('dataset.lighting_off_epoch', 'conv1_lr_cut_epoch',
              'conv1_freeze_epoch'):
    if _get(config, key) < 0 and _get(config, key) != -1:
      raise errors.UserError(f'{key}={_get(config, key)}: give an epoch of 0 '
                             f'or more, or -1 for never')
  for key in ('eval_every_steps', 'checkpoint_every_steps'):
    if _get(config, key) < -1:
      raise errors.UserError(f'{key}={_get(config, key)}: give a number of '
                             f'steps, -1 for once an epoch or 0 for only at '
                             f'the end')
  if config.num_train_steps <= 0 and config.num_train_steps != -1:
    raise errors.UserError(f'num_train_steps={config.num_train_steps}: give a '
                           f'number of steps above 0, or -1 for num_epochs')
  if config.num_train_steps == -1:
    _check_range(config, ('num_epochs',), 0, math.inf, False,
                 'a number above 0 (or set num_train_steps)')
  if config.mesh.data != -1 and config.mesh.data < 1:
    raise errors.UserError(f'mesh.data={config.mesh.data}: give a number of '
                           f'devices, or -1 for all that are left')
  if config.image_size < 64:
    raise errors.UserError(f'image_size={config.image_size} is too small: '
                           f'AlexNet needs at least 64 pixels')
  if config.resize_size < config.image_size:
    raise errors.UserError(
        f'resize_size={config.resize_size} is smaller than image_size='
        f'{config.image_size}: set resize_size >= image_size')
