"""Progress lines for long jobs (prepare, stats, evaluation).

Plain lines, one every config.progress_every_s seconds, so that a log file
reads as well as a terminal (no carriage-return spinners); printed by
process 0 only. A job shorter than that prints nothing.
"""

import time

from alexnet_jax import metric_writer


class Progress:
  """Counts work done out of `total` and now and then reports done/total,
  the rate and the time left."""

  def __init__(self, config, what: str, total: int):
    self._what, self._total = what, total
    self._every_s = config.progress_every_s
    self._start = self._last = time.monotonic()
    self.done = 0

  def add(self, count: int) -> None:
    self.done += count
    now = time.monotonic()
    if now - self._last < self._every_s:
      return
    self._last = now
    rate = self.done / (now - self._start)
    left = (self._total - self.done) / rate if rate > 0 else float('inf')
    metric_writer.report(
        f'{self._what}: {self.done}/{self._total} images '
        f'({100 * self.done / max(1, self._total):.0f}%), {rate:.1f} '
        f'images/sec, {left / 60:.1f} min left')
