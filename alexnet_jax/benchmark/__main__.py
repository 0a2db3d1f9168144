r"""Speed of the train step, input pipeline, whole training and checkpoints.

  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=train_step --config.batch_size=64 --config.mesh.data=1
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=input_pipeline --photos=500x375 [--rate=45000]
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=end_to_end --photos=400x350 --read=raw_store \
      --config.batch_size=64
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=prepare --photos=400x350 --photos_count=1000 [--through_tfds]
  python -m alexnet_jax.benchmark --config=configs/ilsvrc2012.py \
      --what=checkpoint --config.batch_size=64 --config.mesh.data=1

train_step: the batch is random and lives on the devices, so the figure is
the network's and the mesh's alone. input_pipeline: train batches from the
config's dataset, on the host only; with --photos, from synthetic
photo-like JPEGs of that size, their --mode=prepare copy and the raw store
made from it, in turn, with the cores each needs for --rate images/sec.
end_to_end: an input pipeline (with --photos, of --read) feeding the train
step, batches put on the devices two steps ahead, as training runs; and
which of the two bounds it.
prepare: --mode=prepare straight from ImageNet-layout archives of --photos
synthetic photos (10 classes), against the decode limit: one thread of
tf.io.decode_jpeg over the same files.
checkpoint: how long a save of the train state (after one step, so the
momentum is not all zeros) holds up training, how long until it is on disk,
its size, and how long a restore takes.
Compilation and warm-up are excluded; the result is the median over repeats.
The last line printed is one JSON object. The train step imports no
TensorFlow: it runs on machines with only JAX.
"""

# Run as a program, restart with huge pages before importing anything
# large (huge_pages.py says why).
if __name__ == '__main__':
  from alexnet_jax.runtime import huge_pages
  huge_pages.restart_with_huge_pages()

import json
import re

from absl import app
from absl import flags
from ml_collections import config_flags

from alexnet_jax import config as config_lib
from alexnet_jax.benchmark import compute
from alexnet_jax.benchmark import data
from alexnet_jax.runtime import console
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import tf_runtime

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'train_step',
                          ['train_step', 'input_pipeline', 'end_to_end',
                           'checkpoint', 'prepare'],
                          'What to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.',
                               lower_bound=0)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median counts.',
                                lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps (batches) per timed repeat.',
                              lower_bound=1)
_PHOTOS = flags.DEFINE_string(
    'photos', '', 'input_pipeline, end_to_end: WIDTHxHEIGHT of synthetic '
    'photo-like JPEGs to read instead of the config\'s dataset.')
flags.register_validator(
    'photos', lambda value: not value or re.fullmatch(r'[1-9]\d*x[1-9]\d*',
                                                      value),
    message='--photos takes WIDTHxHEIGHT in pixels, e.g. 500x375')
_PHOTOS_COUNT = flags.DEFINE_integer('photos_count', 500,
                                     'How many synthetic photos.',
                                     lower_bound=1)
_READ = flags.DEFINE_enum(
    'read', 'full_size_jpegs', data.PHOTO_SOURCES,
    'end_to_end with --photos: which of them to read.')
_RATE = flags.DEFINE_float(
    'rate', 45000, 'input_pipeline with --photos: the images/sec to plan '
    'for (one H100 in bfloat16); each source\'s cores for it are reported.',
    lower_bound=1)
_THROUGH_TFDS = flags.DEFINE_bool(
    'through_tfds', False, 'prepare: also time the same copy made through '
    'TFDS (building imagenet2012, then prepare from it).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_library_logs()
  config = _CONFIG.value
  try:
    timings = (_WARMUP.value, _REPEATS.value, _STEPS.value)
    if _WHAT.value == 'train_step':
      result = compute.time_train_step(config, *timings)
    elif _WHAT.value == 'checkpoint':
      result = compute.time_checkpoint(config, _REPEATS.value)
    elif _WHAT.value == 'prepare':
      tf_runtime.start()
      result = data.time_prepare(config, _PHOTOS.value or '400x350',
                            _PHOTOS_COUNT.value, _THROUGH_TFDS.value)
    elif _WHAT.value == 'end_to_end':
      tf_runtime.start()
      if _PHOTOS.value:
        with data.on_photos(config, _PHOTOS.value,
                            _PHOTOS_COUNT.value) as (names, photos, _):
          config.dataset.name = names[_READ.value]
          result = dict(data.time_end_to_end(config, *timings), **photos,
                        read=_READ.value)
      else:
        result = data.time_end_to_end(config, *timings)
    elif _PHOTOS.value:
      tf_runtime.start()
      result = data.input_pipeline_on_photos(
          config, _PHOTOS.value, _PHOTOS_COUNT.value, _RATE.value, *timings)
    else:
      tf_runtime.start()
      result = data.time_input_pipeline(config, *timings)
  except errors.UserError as e:
    errors.exit_with_error(str(e), 1)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
