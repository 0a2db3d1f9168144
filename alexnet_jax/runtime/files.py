"""Writing a file so that no reader and no crash ever sees half of it."""

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
