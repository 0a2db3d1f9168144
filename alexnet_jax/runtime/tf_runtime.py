"""TensorFlow as this program uses it: tf.data on the CPU, and quiet.

Loading TensorFlow's C++ libraries prints start-up notices straight to the
process's stderr ("All log messages before absl::InitializeLog()...", the
oneDNN notice), which tell the user nothing. They are written below Python,
so they are silenced by pointing file descriptor 2 elsewhere while the
libraries load; Python's own errors are raised, not printed, meanwhile.
GPUs are hidden from TensorFlow so that a full `tensorflow` install never
takes memory JAX needs. The Python files tf.function writes for tf.data
(autograph) go to a folder of this process's own, removed at exit or, after
a kill, by the next run. Python's garbage collector is paused while the
libraries load: the import makes a great many objects and few cycles, and
a Ctrl-C landing in JAX's collection callback meanwhile would be lost
(interrupts).
"""

import atexit
import contextlib
import gc
import glob
import os
import shutil
import sys
import tempfile

_TEMP_PREFIX = 'alexnet_jax_tf_'


@contextlib.contextmanager
def _stderr_silenced():
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


@contextlib.contextmanager
def _collector_paused():
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _private_temp_dir() -> None:
  """Temporary files of this process in a folder of its own."""
  base = tempfile.gettempdir()
  for stale in glob.glob(os.path.join(base, _TEMP_PREFIX + '*')):
    pid = stale.rsplit('_', 1)[-1]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(stale, ignore_errors=True)
  own = os.path.join(base, f'{_TEMP_PREFIX}{os.getpid()}')
  os.makedirs(own, exist_ok=True)
  atexit.register(shutil.rmtree, own, ignore_errors=True)
  tempfile.tempdir = own


def start() -> None:
  """Load TensorFlow quietly, with no GPU; call before anything imports it."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  _private_temp_dir()
  with _stderr_silenced(), _collector_paused():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    tf.constant(0)  # the runtime's second library loads at the first op
