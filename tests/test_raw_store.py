"""The raw store (--mode=prepare --config.dataset.format=raw): the paper's
256x256 squares as pixels, read by index."""

import errno
import json
import os
import shutil
from unittest import mock

import jax
import numpy as np
import pytest

from command_line import checkpointed_params
from command_line import metric_records
from command_line import run_main
from command_line import tiny_flags
from alexnet_jax.data import dataset_tools
from alexnet_jax.data import raw_store
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import host


def _store(config, out: str, source_name: str) -> str:
  config.dataset.name, config.dataset.format = source_name, 'raw'
  dataset_tools.prepare(config, out)
  config.dataset.format = 'jpeg'
  return out


@pytest.fixture
def copy_and_store(tiny_config, tmp_path):
  """The tiny dataset's 256-px copy, and the raw store made from the copy."""
  copy = str(tmp_path / 'copy')
  dataset_tools.prepare(tiny_config, copy)
  store = _store(tiny_config, str(tmp_path / 'store'), f'folder:{copy}')
  tiny_config.dataset.decoded_in_memory = False
  return copy, store


def _batches(config, name, count, **kwargs):
  config.dataset.name = name
  src = sources.training_source(config, 'train')
  return src, list(stream.train_dataset(config, src, **kwargs)
                   .take(count).as_numpy_iterator())


def test_a_store_holds_the_pixels_of_its_copy_and_gives_the_same_batches(
    tiny_config, copy_and_store):
  copy, store = copy_and_store
  # 12 steps of 16 over 80 images: two epochs and a half.
  from_copy, copy_batches = _batches(tiny_config, f'folder:{copy}', 12)
  from_store, store_batches = _batches(tiny_config, f'folder:{store}', 12)
  assert from_store.pixels is not None and from_copy.pixels is None
  assert from_store.class_names == from_copy.class_names
  assert from_store.num_examples == from_copy.num_examples == 80
  for a, b in zip(copy_batches, store_batches):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Resuming at step 5 gives the same batches from there.
  _, resumed = _batches(tiny_config, f'folder:{store}', 7, start_step=5)
  for a, b in zip(store_batches[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  # The centre crop and the 10 crops of evaluation, too.
  for crops in (1, 10):
    tiny_config.eval.crops = crops
    tiny_config.dataset.name = f'folder:{copy}'
    want = list(stream.eval_batches(
        tiny_config, sources.training_source(tiny_config, 'validation'), 8))
    tiny_config.dataset.name = f'folder:{store}'
    got = list(stream.eval_batches(
        tiny_config, sources.training_source(tiny_config, 'validation'), 8))
    assert len(want) == len(got) == 4
    for a, b in zip(want, got):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# What a metrics record computes (not how long it took).
_COMPUTED = ('step', 'split', 'loss', 'top1_error', 'top5_error', 'examples',
             'learning_rate')


def test_a_run_from_the_store_is_bit_for_bit_the_run_from_the_copy(
    copy_and_store, data_dir, tmp_path):
  """Trained and evaluated (centre crop in training, 10 crops after) from
  the command line, as a user runs it."""
  copy, store = copy_and_store
  flags = [*tiny_flags(data_dir), '--config.dataset.decoded_in_memory=False']
  metrics = {}
  for name, path in (('copy', copy), ('store', store)):
    workdir = f'{tmp_path}/{name}'
    run_main(*flags, f'--config.dataset.name=folder:{path}',
             f'--workdir={workdir}')
    run_main(*flags, f'--config.dataset.name=folder:{path}',
             f'--workdir={workdir}', '--mode=eval', '--config.eval.crops=10')
    metrics[name] = [{k: r.get(k) for k in _COMPUTED}
                     for r in metric_records(workdir) if 'split' in r]
  for a, b in zip(jax.tree.leaves(checkpointed_params(f'{tmp_path}/copy', 4)),
                  jax.tree.leaves(checkpointed_params(f'{tmp_path}/store', 4))):
    np.testing.assert_array_equal(a, b)
  splits = [r['split'] for r in metrics['store']]
  assert 'eval_1crop' in splits and 'eval_10crop' in splits
  assert metrics['copy'] == metrics['store']


def test_the_quickstart_in_memory_is_the_same_pixels_as_its_store(
    tiny_config, tmp_path, monkeypatch):
  """decoded_in_memory and the store are one format: the same Pixels,
  the same batches (the store's pages released after every batch)."""
  monkeypatch.setattr(raw_store, 'RELEASE_EVERY_BYTES', 1)
  store = _store(tiny_config, str(tmp_path / 'store'), 'builtin')
  tiny_config.dataset.decoded_in_memory = True
  kept, kept_batches = _batches(tiny_config, 'builtin', 6)
  stored, stored_batches = _batches(tiny_config, f'folder:{store}', 6)
  assert kept.pixels.path is None and stored.pixels.path is not None
  np.testing.assert_array_equal(kept.pixels.images, stored.pixels.images)
  np.testing.assert_array_equal(kept.pixels.labels, stored.pixels.labels)
  for a, b in zip(kept_batches, stored_batches):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_crops_are_one_gather_of_the_windows():
  rng = np.random.default_rng(0)
  pixels = raw_store.Pixels(rng.integers(0, 256, (5, 12, 12, 3), np.uint8),
                            np.arange(5, dtype=np.int32))
  indices, tops, lefts = np.array([4, 0, 4]), np.array([0, 3, 5]), np.array(
      [7, 1, 0])
  got = pixels.crops(indices, tops, lefts, 5)
  for i, (index, top, left) in enumerate(zip(indices, tops, lefts)):
    np.testing.assert_array_equal(
        got[i], pixels.images[index, top:top + 5, left:left + 5])


def _disk_full_after_batches(count: int):
  """The store's writes fail with ENOSPC once `count` batches are written."""
  real_pwrite, calls = raw_store._pwrite, []

  def pwrite(fd, data, offset):
    calls.append(offset)
    if len(calls) > 2 * count:   # images and labels: two writes a batch
      raise OSError(errno.ENOSPC, 'No space left on device')
    real_pwrite(fd, data, offset)

  return mock.patch.object(raw_store, '_pwrite', pwrite)


def test_a_killed_prepare_goes_on_and_a_full_disk_loses_nothing(
    tiny_config, tmp_path, monkeypatch):
  whole = _store(tiny_config, str(tmp_path / 'whole'), 'builtin')
  # Batches of 16, and the disk full at the fourth: three are kept.
  monkeypatch.setattr(sources, '_DECODE_BATCH', 16)
  out = str(tmp_path / 'store')
  with _disk_full_after_batches(3):
    with pytest.raises(OSError, match='No space left'):
      _store(tiny_config, out, 'builtin')
  assert os.path.exists(os.path.join(out, sources.UNFINISHED_COPY))
  tiny_config.dataset.name = f'folder:{out}'
  with pytest.raises(errors.DatasetError, match='did not finish: run the same'):
    sources.source(tiny_config, 'train')
  assert raw_store.rows_written(out, 'train', 1, 0) == 48
  _store(tiny_config, out, 'builtin')   # the same command again
  assert not os.path.exists(os.path.join(out, sources.UNFINISHED_COPY))
  assert not [f for f in os.listdir(os.path.join(out, 'train'))
              if f.startswith('written')]
  for split in ('train', 'validation'):
    a = raw_store.open_split(whole, split, tiny_config.resize_size)
    b = raw_store.open_split(out, split, tiny_config.resize_size)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_a_store_that_does_not_fit_its_disk_is_refused_before_writing(
    tiny_config, tmp_path):
  out = str(tmp_path / 'store')
  small = shutil.disk_usage(str(tmp_path))._replace(free=10**6)
  with mock.patch.object(shutil, 'disk_usage', return_value=small):
    with pytest.raises(errors.DatasetError,
                       match=r'needs 2 MB more in .*store and its disk has 1 MB free: free'):
      _store(tiny_config, out, 'builtin')
  assert not os.path.exists(out)


def test_a_damaged_store_or_one_of_another_size_is_one_line(
    tiny_config, tmp_path):
  store = _store(tiny_config, str(tmp_path / 'store'), 'builtin')
  tiny_config.dataset.name = f'folder:{store}'
  for store_format in ('jpeg', 'raw'):
    tiny_config.dataset.format = store_format
    with pytest.raises(errors.UserError, match='is a raw store already'):
      dataset_tools.prepare(tiny_config, str(tmp_path / store_format))
  side = tiny_config.resize_size
  tiny_config.resize_size = side + 8
  with pytest.raises(errors.DatasetError,
                     match=f'holds {side}x{side} images but resize_size is '
                           f'{side + 8}: set --config.resize_size={side}'):
    sources.source(tiny_config, 'train')
  tiny_config.resize_size = side
  images = os.path.join(store, 'train', 'images.npy')
  with open(images, 'r+b') as f:
    f.truncate(os.path.getsize(images) - 1000)
  with pytest.raises(errors.DatasetError,
                     match='images.npy is damaged .*truncated.*: prepare'):
    sources.source(tiny_config, 'train')
  with open(images, 'r+b') as f:
    f.write(b'not an array')
  with pytest.raises(errors.DatasetError, match='damaged .no array header'):
    sources.source(tiny_config, 'train')
  with open(os.path.join(store, raw_store.MANIFEST), 'w') as f:
    f.write('{"format": "raw", "clas')
  with pytest.raises(errors.DatasetError,
                     match='manifest.json is damaged .*: prepare the dataset'):
    sources.source(tiny_config, 'train')


def test_a_store_with_other_classes_than_the_checkpoint_is_refused(
    tiny_config, data_dir, tmp_path):
  store = _store(tiny_config, str(tmp_path / 'store'), 'builtin')
  workdir = str(tmp_path / 'run')
  flags = [*tiny_flags(data_dir), f'--config.dataset.name=folder:{store}',
           f'--workdir={workdir}']
  run_main(*flags, '--config.num_train_steps=2')
  before = metric_records(workdir)
  manifest = os.path.join(store, raw_store.MANIFEST)
  with open(manifest) as f:
    contents = json.load(f)
  contents['classes'][3], contents['classes'][4] = (contents['classes'][4],
                                                    contents['classes'][3])
  with open(manifest, 'w') as f:
    json.dump(contents, f)
  for mode in ('--mode=train', '--mode=eval'):
    result = run_main(*flags, mode, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: folder:{store} does not have the classes the network in '
        f'{workdir} was trained on (label 3: \'star\' here, \'pentagon\' '
        f'there): use the dataset it was trained on']
  assert metric_records(workdir) == before


def test_a_store_larger_than_free_memory_is_said_with_its_bandwidth(
    tiny_config, tmp_path, monkeypatch, capsys):
  store = _store(tiny_config, str(tmp_path / 'store'), 'builtin')
  tiny_config.dataset.name = f'folder:{store}'
  tiny_config.dataset.planned_images_per_sec = 1000
  images = os.path.join(store, 'train', 'images.npy')
  size = 80 * 73 * 73 * 3
  capsys.readouterr()
  monkeypatch.setattr(host, 'available_memory', lambda: size)
  sources.training_source(tiny_config, 'train')
  assert capsys.readouterr().err == ''
  monkeypatch.setattr(host, 'available_memory', lambda: size - 1)
  sources.training_source(tiny_config, 'train')
  assert capsys.readouterr().err.splitlines() == [
      f'warning: the raw store {images} (1 MB) is larger than this host\'s '
      f'free memory (1 MB), so it is read from disk: 1,000 images/sec needs '
      f'16 MB/s from it']


def test_a_store_straight_from_imagenet_s_tars_holds_their_images_in_order(
    tiny_config, tmp_path, monkeypatch):
  """Each archive image's 256x256 square (here resize_size), in the order
  the archives hold them, labelled as TFDS labels them, without TFDS; made
  in two goes, the first stopped by a full disk after two batches of 4."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import augment  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import imagenet_archives  # pylint: disable=g-import-not-at-top
  manual = fake_imagenet.write(str(tmp_path / 'manual'), train_per_class=3,
                               val_images=5, odd_files=True)
  tiny_config.dataset.name = 'imagenet2012'
  tiny_config.dataset.data_dir = str(tmp_path / 'no_tfds')
  tiny_config.dataset.manual_dir = manual
  tiny_config.dataset.format = 'raw'
  store = str(tmp_path / 'store')
  monkeypatch.setattr(sources, '_DECODE_BATCH', 4)
  with _disk_full_after_batches(2):
    with pytest.raises(OSError, match='No space left'):
      dataset_tools.prepare(tiny_config, store)
  assert raw_store.rows_written(store, 'train', 1, 0) == 8
  dataset_tools.prepare(tiny_config, store)
  classes = imagenet_archives.class_names()
  assert raw_store.manifest(store)['classes'] == list(classes)
  for split in ('train', 'validation'):
    got = raw_store.open_split(store, split, tiny_config.resize_size)
    given = list(imagenet_archives.images(manual, split))
    assert len(got.labels) == len(given) == {'train': 11, 'validation': 5}[
        split]
    for image, label, (class_name, _, data, _) in zip(got.images, got.labels,
                                                      given):
      assert label == classes.index(class_name)
      np.testing.assert_array_equal(image, augment.paper_image(
          tf.constant(data), tiny_config.resize_size))


def test_the_readme_s_raw_store_commands_prepare_from_tars_and_train(
    tmp_path):
  """The README's two raw-store commands, on fake archives: the store
  straight from the tars, then training from it (and evaluating it), the
  network and the run made small."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  tars = fake_imagenet.write(str(tmp_path / 'tars'))
  store, run = str(tmp_path / 'imagenet_raw'), str(tmp_path / 'alexnet')
  config = ['--config=configs/ilsvrc2012.py',
            f'--config.dataset.data_dir={tmp_path / "tfds"}']
  made = run_main(*config, '--mode=prepare', f'--workdir={store}',
                  '--config.dataset.format=raw',
                  f'--config.dataset.manual_dir={tars}')
  assert f'train from it with --config.dataset.name=folder:{store}' in (
      made.stdout)
  from_store = [*config, f'--workdir={run}',
                f'--config.dataset.name=folder:{store}',
                '--config.model.width=0.125', '--config.batch_size=4',
                '--config.num_train_steps=2', '--config.eval.batch_size=4']
  run_main(*from_store)
  trained = [r for r in metric_records(run) if 'split' in r][-1]
  assert trained['step'] == 2 and trained['examples'] == 6
  run_main(*from_store, '--mode=eval')
  assert metric_records(run)[-1]['top1_error'] == trained['top1_error']
