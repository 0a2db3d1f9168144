"""--mode=prepare (the 256-px copy) and --mode=stats (mean and PCA)."""

import glob
import io
import os
import re
import signal
import time

import numpy as np
from PIL import Image
import pytest

from command_line import run_main
from command_line import start_main
from command_line import tiny_flags
from alexnet_jax import config as config_lib
from alexnet_jax import dataset_stats
from alexnet_jax import dataset_tools
from alexnet_jax import errors
from alexnet_jax import input_pipeline
from alexnet_jax import normalization


def test_prepare_writes_a_copy_at_resize_size_that_gives_the_same_batches(
    tiny_config, tmp_path):
  copy = str(tmp_path / 'copy')
  dataset_tools.prepare(tiny_config, copy)
  original = input_pipeline.source(tiny_config, 'train')
  source_name = tiny_config.dataset.name
  tiny_config.dataset.name = f'folder:{copy}'
  prepared = input_pipeline.source(tiny_config, 'train')
  assert prepared.class_names == original.class_names
  assert prepared.num_examples == 80
  assert input_pipeline.source(tiny_config, 'validation').num_examples == 30
  star = glob.glob(os.path.join(copy, 'train', 'star', '*'))
  assert len(star) == 8
  for f in star:
    assert min(Image.open(f).size) == tiny_config.resize_size
  labels = [y for _, y in prepared.examples.as_numpy_iterator()]
  np.testing.assert_array_equal(np.bincount(labels), [8] * 10)
  # The first batch is the same examples, crops and flips as the source's,
  # resampled once more: close in pixels, unlike another batch.
  batches = [next(input_pipeline.train_dataset(tiny_config, source)
                  .as_numpy_iterator()) for source in (prepared, original)]
  np.testing.assert_array_equal(batches[0]['label'], batches[1]['label'])
  difference = lambda a, b: np.abs(a.astype(float) - b).mean()
  near = difference(batches[0]['image'], batches[1]['image'])
  other = difference(batches[0]['image'], batches[1]['image'][::-1])
  assert near < 0.25 * other
  tiny_config.dataset.name = source_name
  with pytest.raises(errors.UserError, match='already holds a prepared copy'):
    dataset_tools.prepare(tiny_config, copy)
  tiny_config.dataset.name = f'folder:{copy}'  # the copy into itself
  with pytest.raises(errors.UserError, match='inside the dataset it would'):
    dataset_tools.prepare(tiny_config, f'{copy}/again')


def test_stats_are_the_mean_and_colour_pca_of_the_images(tiny_config,
                                                        tmp_path):
  # Lossless images already at resize_size, so the numbers can be checked
  # against the pixels themselves.
  rng = np.random.default_rng(0)
  size = tiny_config.resize_size
  mixing = np.array([[1.0, 0.5, 0.2], [0.0, 1.0, 0.4], [0.0, 0.0, 0.5]])
  images = []
  for i in range(12):
    pixels = rng.normal(0, 30, (size, size, 3)) @ mixing + (120, 100, 80)
    images.append(np.clip(pixels, 0, 255).astype(np.uint8))
    folder = tmp_path / 'data' / 'train' / f'c{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(images[-1]).save(buffer, format='PNG')
    (folder / f'{i}.png').write_bytes(buffer.getvalue())
  tiny_config.dataset.name = f'folder:{tmp_path}/data'
  tiny_config.dataset.stats_examples = 0
  stats = dataset_tools.stats(tiny_config, str(tmp_path / 'work'))
  pixels = np.stack(images).astype(float)
  np.testing.assert_allclose(stats.mean_image, pixels.mean(0), atol=1e-6)
  np.testing.assert_allclose(stats.mean_rgb, pixels.reshape(-1, 3).mean(0))
  covariance = np.cov(pixels.reshape(-1, 3).T, bias=True)
  v, s = stats.pca_eigvecs, stats.pca_eigvals
  np.testing.assert_allclose(v @ np.diag(s ** 2) @ v.T, covariance,
                             rtol=1e-6)
  assert list(s) == sorted(s, reverse=True)
  # The default samples stats_examples images: the mean of 5 of the 12.
  tiny_config.dataset.stats_examples = 5
  sample = dataset_tools.stats(tiny_config, str(tmp_path / 'sample'))
  weights = np.linalg.lstsq(pixels.reshape(12, -1).T,
                            5 * sample.mean_image.ravel(), rcond=None)[0]
  np.testing.assert_allclose(np.sort(weights), [0] * 7 + [1] * 5, atol=1e-6)
  # The saved file feeds the config: per-channel, or the centre of the mean
  # image per pixel, as the released code subtracted it.
  tiny_config.dataset.stats_file = str(tmp_path / 'work' /
                                       dataset_stats.FILE_NAME)
  np.testing.assert_allclose(normalization.mean(tiny_config), stats.mean_rgb,
                             rtol=1e-6)
  tiny_config.dataset.mean = 'per_pixel'
  start = (size - tiny_config.image_size) // 2
  np.testing.assert_allclose(
      normalization.mean(tiny_config),
      stats.mean_image[start:start + 64, start:start + 64], rtol=1e-6)
  eigvals, eigvecs = dataset_stats.pca(tiny_config)
  np.testing.assert_array_equal(eigvecs, v)
  (tmp_path / 'bad.npz').write_bytes(b'not numpy')
  tiny_config.dataset.stats_file = str(tmp_path / 'bad.npz')
  with pytest.raises(errors.UserError, match='make it with --mode=stats'):
    normalization.mean(tiny_config)


def test_stats_settings_that_cannot_work_are_refused_up_front(tiny_config,
                                                             tmp_path):
  tiny_config.dataset.mean = 'per_pixel'
  with pytest.raises(errors.UserError, match='run --mode=stats'):
    config_lib.validate(tiny_config)
  tiny_config.dataset.stats_file = str(tmp_path / 'missing.npz')
  with pytest.raises(errors.UserError, match='does not exist: make it with'):
    config_lib.validate(tiny_config)


def _files(folder):
  """Relative path -> (bytes, mtime_ns) of every image file under folder."""
  found = {}
  for path in glob.glob(os.path.join(folder, '*', '*', '*')):
    with open(path, 'rb') as f:
      found[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
  return found


def test_a_prepare_killed_partway_resumes_to_the_same_copy(tmp_path, data_dir):
  """SIGKILL once images are being written; the same command then finishes
  the copy without rewriting what was written, file for file equal to an
  uninterrupted copy. Until then training refuses the copy. Progress lines
  appear with stdout going to a file."""
  flags = [*tiny_flags(data_dir), '--mode=prepare',
           '--config.dataset.builtin_train_per_class=60']
  whole = tmp_path / 'whole'
  done = run_main(*flags, f'--workdir={whole}', '--config.progress_every_s=0')
  assert re.search(r'train: writing: \d+/600 images \(\d+%\), [\d.]+ '
                   r'images/sec, [\d.]+ min left', done.stdout), done.stdout

  killed = tmp_path / 'killed'
  run = start_main(*flags, f'--workdir={killed}')
  deadline = time.monotonic() + 120
  while len(glob.glob(str(killed / 'train' / '*' / '*.jpeg'))) < 50:
    assert time.monotonic() < deadline and run.poll() is None
    time.sleep(0.02)
  run.send_signal(signal.SIGKILL)
  run.communicate()
  assert not (killed / 'manifest.json').exists(), 'it finished before the kill'
  before = _files(killed)
  refused = run_main(*tiny_flags(data_dir), f'--workdir={tmp_path / "run"}',
                     f'--config.dataset.name=folder:{killed}', check=False)
  assert refused.returncode == 1
  assert 'did not finish: run the same prepare command' in refused.stderr

  run_main(*flags, f'--workdir={killed}')
  after, uninterrupted = _files(killed), _files(whole)
  assert {k: v[0] for k, v in after.items()} == {
      k: v[0] for k, v in uninterrupted.items()}
  finished = {k: v for k, v in before.items() if k.endswith('.jpeg')}
  assert finished and all(after[k][1] == v[1] for k, v in finished.items())
  assert not (killed / input_pipeline.UNFINISHED_COPY).exists()
