"""Files that other processes may read, write or remove meanwhile: written
so that no reader and no crash sees half of one, and locked so that a lock
is never held on a file that is gone."""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w'):
  """A file opened as PATH.tmp, renamed onto path when the block ends
  without an error: a rename within a folder is atomic, so path holds the
  old content or the new, never part of it."""
  with open(path + '.tmp', mode) as f:
    yield f
  os.replace(path + '.tmp', path)


def still_at(path: str, fd: int) -> bool:
  """Whether the file or folder open as `fd` is still the one at `path`.

  A lock taken (flock) on something another process removed, and perhaps
  made again, between our open and our flock guards nothing: check this
  after the flock, and open again where it is False."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False
