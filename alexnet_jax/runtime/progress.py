"""Progress lines for long jobs (prepare, stats, evaluation, TFDS builds).

Plain lines, one every progress_every_s seconds, so that a log file
reads as well as a terminal (no carriage-return spinners); printed by
process 0 only. A job shorter than that prints nothing.
"""

import contextlib
import re
import time
from typing import Optional

from alexnet_jax.runtime import console


class Progress:
  """Counts images done and now and then reports how far the job is, the
  rate and the time left.

  The job's size `total` is in images, or with `archive` (a file's name) in
  bytes of that archive: a tar's image count is not known before reading it
  all, its size is.
  """

  def __init__(self, every_s: float, what: str, total: float,
               archive: Optional[str] = None):
    self._what, self._total, self._archive = what, total, archive
    self._every_s = every_s
    self._start = self._last = time.monotonic()
    self.done = 0
    self._work = 0.0

  def add(self, count: int, work: Optional[float] = None) -> None:
    """`count` more images, standing for `work` of the total (default:
    `count`)."""
    self.done += count
    self._work += count if work is None else work
    now = time.monotonic()
    if now - self._last < self._every_s:
      return
    self._last = now
    elapsed = now - self._start
    fraction = min(1.0, self._work / max(1, self._total))
    left = elapsed * (1 - fraction) / fraction if fraction else float('inf')
    done = (f'{self.done} images from {100 * fraction:.0f}% of '
            f'{self._archive}' if self._archive else
            f'{self.done}/{self._total} images ({100 * fraction:.0f}%)')
    console.report(
        f'{self._what}: {done}, {self.done / elapsed:.1f} images/sec, '
        f'{left / 60:.1f} min left')


class _Lines:
  """A file for tqdm that prints each refresh of a bar as a plain line."""

  def write(self, text: str) -> None:
    line = re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', text.replace('\r', '')).strip()
    if line:
      console.report(line)

  def flush(self) -> None:
    pass


@contextlib.contextmanager
def tfds_bars_as_lines(every: float, tfds):
  """While TFDS builds a dataset, its own tqdm bars (examples done/total,
  rate, time left) as a plain line every `every` seconds."""
  import tqdm  # pylint: disable=g-import-not-at-top  # TFDS's dependency
  original = tfds.core.utils.tqdm

  def bar(*args, **kwargs):
    return tqdm.tqdm(*args, **dict(kwargs, file=_Lines(), mininterval=every,
                                   maxinterval=max(every, 1), ascii=True))

  tfds.core.utils.tqdm = bar
  try:
    yield
  finally:
    tfds.core.utils.tqdm = original
