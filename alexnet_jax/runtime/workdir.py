"""The run's folder: checked before any work, and held by one job at a time.

Two jobs writing one workdir (a duplicate submission, a SLURM requeue while
the first is still saving) would interleave their metrics and overwrite each
other's checkpoints. A job therefore holds `job.lock` in the workdir for as
long as it runs: an exclusive `flock` that the kernel drops when the holder
dies, with the holder's host, pid and start time written inside so that a
refused job can name it. The processes of one multi-process job share the
lock: process 0 takes it and tells the others.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from typing import Iterator

from alexnet_jax.runtime import console
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import files

LOCK_FILE = 'job.lock'


def _existing_ancestor(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check(workdir: str, writable: bool = True, flag: str = '--workdir') -> str:
  """The workdir as an absolute path, refused at once if it cannot be used.

  writable: the job writes there (also checks, without changing anything,
  that the folder or the nearest existing folder above it takes files).
  flag: the option that named the folder, for the error.
  """
  if not workdir or not workdir.strip():
    raise errors.UserError(f'{flag} is empty: give the folder for the '
                           f'run\'s output')
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f'{flag}={workdir} is a file, not a folder: '
                           f'give a folder (it is made if missing)')
  if writable:
    probe_dir = _existing_ancestor(path)
    try:
      with tempfile.TemporaryFile(dir=probe_dir):
        pass
    except OSError as e:
      raise errors.UserError(
          f'cannot write in {flag}={workdir} ({probe_dir}: '
          f'{e.strerror}): give a folder you can write to') from e
  return path


def _holder_text(holder: dict) -> str:
  return (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, '
          f'started {holder.get("started", "?")}')


def _read_holder(handle) -> dict:
  handle.seek(0)
  try:
    return json.loads(handle.read() or '{}')
  except ValueError:
    return {}


def _take(path: str):
  """The open, flocked lock file of a new job; raises if another holds it."""
  created = not os.path.isdir(path)
  try:
    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, LOCK_FILE), 'a+')
  except OSError as e:
    raise errors.UserError(f'cannot write in --workdir={path} '
                           f'({e.strerror}): give a folder you can write '
                           f'to') from e
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(handle)
    handle.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES):
      raise errors.UserError(f'cannot lock {path}/{LOCK_FILE} '
                             f'({e.strerror})') from e
    raise errors.UserError(
        f'{path} is in use by another job ({_holder_text(holder)}): wait '
        f'for it to end or stop it, or give another --workdir')
  if not files.still_at(handle.name, handle.fileno()):
    # the holder ended and removed the file between open and flock
    handle.close()
    return _take(path)[0], created
  stale = _read_holder(handle)
  if stale:
    console.warning(f'{path}: taking over the lock of a job that is no '
                    f'longer running ({_holder_text(stale)})')
  handle.seek(0)
  handle.truncate()
  json.dump({'host': socket.gethostname(), 'pid': os.getpid(),
             'started': datetime.datetime.now().isoformat(timespec='seconds'),
             'command': ' '.join(sys.argv)}, handle)
  handle.flush()
  return handle, created


# The lock this process holds, for release_now(): (workdir, handle, created).
_held = None


def release_now() -> None:
  """Release the lock this process holds (if any), also before an exit
  that skips every `finally` (a second Ctrl-C exits at once)."""
  global _held
  if _held is not None:
    held, _held = _held, None
    _release(*held)


def _release(path: str, handle, created: bool) -> None:
  os.remove(os.path.join(path, LOCK_FILE))
  handle.close()
  if created and not os.listdir(path):
    os.rmdir(path)   # a job refused before it wrote anything leaves no trace


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[str]:
  """Within `with`, this job alone uses workdir (made if missing).

  Yields the absolute path. With several processes, all of them enter or
  all raise the same error.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  path = check(workdir)
  taken, failure = None, ''
  if jax.process_index() == 0:
    try:
      taken = _take(path)
    except errors.UserError as e:
      failure = str(e)
  if jax.process_count() > 1:
    failure = _broadcast_text(failure, multihost_utils)
  if failure:
    raise errors.UserError(failure)
  global _held
  _held = (path, *taken) if taken is not None else None
  try:
    yield path
  finally:
    release_now()


def _broadcast_text(text: str, multihost_utils) -> str:
  """Process 0's text, on every process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  data = np.zeros(1024, np.uint8)
  encoded = text.encode()[:1024]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8)
  return bytes(data).rstrip(b'\0').decode(errors='replace')
