"""--mode=prepare (the 256-px copy) and --mode=stats (mean and PCA)."""

import copy
import glob
import io
import json
import os
import re
import shutil
import signal
import time
from unittest import mock

import jax
import numpy as np
from PIL import Image
import pytest

from command_line import metric_records
from command_line import run_main
from command_line import start_main
from command_line import tiny_flags
from alexnet_jax import config as config_lib
from alexnet_jax.data import dataset_stats
from alexnet_jax.data import dataset_tools
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import imagenet_archives
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.runtime import errors


def test_prepare_writes_a_copy_at_resize_size_that_gives_the_same_batches(
    tiny_config, tmp_path):
  copy = str(tmp_path / 'copy')
  dataset_tools.prepare(tiny_config, copy)
  original = sources.source(tiny_config, 'train')
  source_name = tiny_config.dataset.name
  tiny_config.dataset.name = f'folder:{copy}'
  prepared = sources.source(tiny_config, 'train')
  assert prepared.class_names == original.class_names
  assert prepared.num_examples == 80
  assert sources.source(tiny_config, 'validation').num_examples == 30
  star = glob.glob(os.path.join(copy, 'train', 'star', '*'))
  assert len(star) == 8
  for f in star:
    assert min(Image.open(f).size) == tiny_config.resize_size
  labels = [y for _, y in prepared.examples.as_numpy_iterator()]
  np.testing.assert_array_equal(np.bincount(labels), [8] * 10)
  # The first batch is the same examples, crops and flips as the source's,
  # resampled once more: close in pixels, unlike another batch.
  batches = [next(stream.train_dataset(tiny_config, source)
                  .as_numpy_iterator()) for source in (prepared, original)]
  np.testing.assert_array_equal(batches[0]['label'], batches[1]['label'])
  difference = lambda a, b: np.abs(a.astype(float) - b).mean()
  near = difference(batches[0]['image'], batches[1]['image'])
  other = difference(batches[0]['image'], batches[1]['image'][::-1])
  assert near < 0.25 * other
  tiny_config.dataset.name = source_name
  with pytest.raises(errors.UserError, match='already holds a prepared dataset'):
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
  np.testing.assert_allclose(device_preprocessing.mean(tiny_config), stats.mean_rgb,
                             rtol=1e-6)
  tiny_config.dataset.mean = 'per_pixel'
  start = (size - tiny_config.image_size) // 2
  np.testing.assert_allclose(
      device_preprocessing.mean(tiny_config),
      stats.mean_image[start:start + 64, start:start + 64], rtol=1e-6)
  eigvals, eigvecs = dataset_stats.pca(tiny_config)
  np.testing.assert_array_equal(eigvecs, v)
  (tmp_path / 'bad.npz').write_bytes(b'not numpy')
  tiny_config.dataset.stats_file = str(tmp_path / 'bad.npz')
  with pytest.raises(errors.UserError, match='make it with --mode=stats'):
    device_preprocessing.mean(tiny_config)


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
  assert not (killed / sources.UNFINISHED_COPY).exists()


def _images_by_class(copy):
  """split/class -> the sorted bytes of its images, whatever their names."""
  found = {}
  for path in glob.glob(os.path.join(copy, '*', '*', '*')):
    with open(path, 'rb') as f:
      found.setdefault(os.path.relpath(os.path.dirname(path), copy),
                       []).append(f.read())
  return {folder: sorted(images) for folder, images in found.items()}


def _imagenet_config(config, data_dir, manual_dir):
  config.dataset.name = 'imagenet2012'
  config.dataset.data_dir = str(data_dir)
  config.dataset.manual_dir = str(manual_dir)
  config.progress_every_s = 0
  return config


def test_prepare_from_imagenet_s_archives_equals_the_copy_through_tfds(
    tiny_config, tmp_path, capsys):
  """Straight from the tars, without building TFDS's imagenet2012: the same
  images in the same class folders, byte for byte, as a copy made through
  TFDS, its CMYK and PNG files converted as TFDS converts them."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual = fake_imagenet.write(str(tmp_path / 'manual'), train_per_class=3,
                               val_images=5, odd_files=True)
  direct = _imagenet_config(tiny_config, tmp_path / 'no_tfds', manual)
  dataset_tools.prepare(direct, str(tmp_path / 'direct'))
  assert not tfds.builder('imagenet2012',
                          data_dir=str(tmp_path / 'no_tfds')).is_prepared()
  shown = capsys.readouterr().out
  assert re.search(r'train: writing: \d+ images from \d+% of '
                   r'ILSVRC2012_img_train.tar, [\d.]+ images/sec', shown)

  through_tfds = _imagenet_config(copy.deepcopy(tiny_config),
                                  tmp_path / 'tfds', manual)
  sources.source(through_tfds, 'train')  # builds imagenet2012
  dataset_tools.prepare(through_tfds, str(tmp_path / 'through_tfds'))
  images = _images_by_class(str(tmp_path / 'direct'))
  assert images == _images_by_class(str(tmp_path / 'through_tfds'))
  assert sum(map(len, images.values())) == 3 * 3 + 2 + 5
  assert {folder for folder in images if folder.startswith('train')} == {
      f'train/{wnid}' for wnid in fake_imagenet.CLASSES + tuple(
          name.split('_')[0] for name in (fake_imagenet.CMYK_FILE,
                                          fake_imagenet.PNG_FILE))}
  for made in ('direct', 'through_tfds'):
    with open(tmp_path / made / 'manifest.json') as f:
      assert json.load(f)['classes'][:3] == list(fake_imagenet.CLASSES)
  assert os.path.exists(tmp_path / 'direct' / 'validation' / 'n01751748' /
                        'ILSVRC2012_val_00000001.jpeg')


def test_prepare_from_the_archives_goes_on_where_it_stopped(tiny_config,
                                                            tmp_path):
  """A copy that lost its last images (and its manifest) to an interruption
  is completed by the same command, equal to the whole copy, without
  rewriting what was there; processes take disjoint shares of the tars."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  manual = fake_imagenet.write(str(tmp_path / 'manual'))
  config = _imagenet_config(tiny_config, tmp_path / 'no_tfds', manual)
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  dataset_tools.prepare(config, whole)
  shutil.copytree(whole, resumed)
  os.remove(os.path.join(resumed, 'manifest.json'))
  open(os.path.join(resumed, sources.UNFINISHED_COPY), 'w').close()
  lost = sorted(glob.glob(os.path.join(resumed, 'train', '*', '*')))[-5:]
  for path in lost:
    os.remove(path)
  kept = {p: os.stat(p).st_mtime_ns
          for p in glob.glob(os.path.join(resumed, '*', '*', '*'))}
  dataset_tools.prepare(config, resumed)
  assert _files(resumed).keys() == _files(whole).keys()
  assert {k: v[0] for k, v in _files(resumed).items()} == {
      k: v[0] for k, v in _files(whole).items()}
  assert {p: os.stat(p).st_mtime_ns for p in kept} == kept

  shares = []
  for index in (0, 1):
    with mock.patch.object(jax, 'process_count', lambda: 2), \
        mock.patch.object(jax, 'process_index', lambda i=index: i):
      shares.append({stem for split in ('train', 'validation')
                     for _, stem, _, _ in imagenet_archives.images(manual,
                                                                   split)})
  assert not shares[0] & shares[1]
  assert len(shares[0] | shares[1]) == 3 * 4 + 6


def test_a_damaged_class_tar_stops_prepare_in_one_error_keeping_its_work(
    tiny_config, tmp_path):
  """The outer headers are whole, so the up-front check passes; the second
  class's tar is garbage. The error names the archive, and the first
  class's images stay for the next run."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  manual = fake_imagenet.write(str(tmp_path / 'manual'))
  path = os.path.join(manual, imagenet_archives.TRAIN_ARCHIVE)
  with tarfile.open(path) as archive:
    second = archive.getmembers()[1]
  with open(path, 'r+b') as f:
    f.seek(second.offset_data)
    f.write(b'x' * 512)
  config = _imagenet_config(tiny_config, tmp_path / 'no_tfds', manual)
  with pytest.raises(errors.DatasetError,
                     match='ILSVRC2012_img_train.tar is damaged .* the same '
                           'command goes on from them'):
    dataset_tools.prepare(config, str(tmp_path / 'copy'))
  assert len(os.listdir(tmp_path / 'copy' / 'train' /
                        fake_imagenet.CLASSES[0])) == 4


def test_the_readme_s_imagenet_commands_prepare_train_and_evaluate(tmp_path):
  """The README's three commands in order, on fake archives: prepare the
  copy from the tars, train from the copy, evaluate it. Only the network's
  size and the run's length are overridden."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  tars = fake_imagenet.write(str(tmp_path / 'tars'))
  copy_dir, run = str(tmp_path / 'imagenet256'), str(tmp_path / 'alexnet')
  config = ['--config=configs/ilsvrc2012.py',
            f'--config.dataset.data_dir={tmp_path / "tfds"}']
  run_main(*config, '--mode=prepare', f'--workdir={copy_dir}',
           f'--config.dataset.manual_dir={tars}')
  with open(os.path.join(copy_dir, 'manifest.json')) as f:
    assert len(json.load(f)['classes']) == 1000
  small = ['--config.model.width=0.125', '--config.batch_size=4',
           '--config.num_train_steps=2', '--config.eval.batch_size=4']
  from_copy = [*config, f'--workdir={run}',
               f'--config.dataset.name=folder:{copy_dir}', *small]
  run_main(*from_copy)
  trained = [r for r in metric_records(run) if r['split'] == 'eval_1crop'][-1]
  assert trained['step'] == 2 and trained['examples'] == 6
  run_main(*from_copy, '--mode=eval')
  evaluated = metric_records(run)[-1]
  assert evaluated['split'] == 'eval_1crop' and evaluated['examples'] == 6
  assert evaluated['top1_error'] == trained['top1_error']
  assert evaluated['loss'] == pytest.approx(trained['loss'], rel=1e-6)
