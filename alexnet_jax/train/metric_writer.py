"""A run's metrics, once per job (process 0): to metrics.jsonl (one JSON
object per point) and to TensorBoard."""

import json
import os
from typing import Optional

import jax

from alexnet_jax.runtime import files


class MetricWriter:
  """Writes once per job (process 0); every process may call it."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._summaries = {}
    self._workdir = workdir

  def mark_replayed(self, step: int) -> None:
    """Mark the training and evaluation points after `step` as "replayed":
    true.

    A run that resumes at `step` computes those steps again; the earlier
    points came from a stretch of training whose checkpoint was never kept.
    They stay in the file, marked, so that nothing is lost and a reader can
    leave them out.
    """
    if not self._active or not os.path.exists(self._path):
      return
    with open(self._path) as f:
      lines = f.readlines()
    changed = False
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except ValueError:
        continue   # a line cut short by a crash
      split = record.get('split', '')
      if ((split == 'train' or split.startswith('eval'))
          and record.get('step', 0) > step
          and not record.get('replayed')):
        record['replayed'] = True
        lines[i] = json.dumps(record) + '\n'
        changed = True
    if changed:
      with files.atomic_write(self._path) as f:
        f.writelines(lines)

  def write(self, step: int, split: str, scalars: dict[str, float],
            labels: Optional[dict[str, str]] = None) -> None:
    """scalars to metrics.jsonl and TensorBoard; labels (what the scalars
    are of) to metrics.jsonl only."""
    if not self._active:
      return
    import tensorflow as tf  # TensorBoard events; not needed on GPU hosts
    record = {'step': int(step), 'split': split, **(labels or {})}
    record.update({k: float(v) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    with self._summary(split).as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, float(value), step=int(step))
    self._summaries[split].flush()

  def write_images(self, step: int, split: str, images) -> None:
    """uint8 (H, W, 3) images by name, to TensorBoard only."""
    if not self._active:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._summary(split).as_default():
      for name, image in images.items():
        tf.summary.image(name, image[None], step=int(step))
    self._summaries[split].flush()

  def _summary(self, split: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if split not in self._summaries:
      self._summaries[split] = tf.summary.create_file_writer(
          os.path.join(self._workdir, 'tensorboard', split))
    return self._summaries[split]
