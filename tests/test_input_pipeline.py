"""The built-in dataset and the tf.data paths that read it."""

import dataclasses
import fcntl
import hashlib
import io
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import builtin_data
from alexnet_jax.data import screening
from alexnet_jax.data import sources
from alexnet_jax.data import stream
from alexnet_jax.runtime import errors
from alexnet_jax.runtime import host


def _digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for f in sorted(files):
      with open(os.path.join(root, f), 'rb') as fh:
        h.update(f.encode() + fh.read())
  return h.hexdigest()


def test_builtin_dataset_is_deterministic_varied_jpegs(tmp_path):
  counts = {'train': 4, 'validation': 2}
  a = builtin_data.ensure(str(tmp_path / 'a'), 7, counts)
  b = builtin_data.ensure(str(tmp_path / 'b'), 7, counts)
  c = builtin_data.ensure(str(tmp_path / 'c'), 8, counts)
  assert _digest(a) == _digest(b) != _digest(c)
  assert sorted(os.listdir(os.path.join(a, 'train'))) == sorted(
      builtin_data.CLASSES)
  sizes = set()
  for kind in builtin_data.CLASSES:
    for f in os.listdir(os.path.join(a, 'train', kind)):
      data = open(os.path.join(a, 'train', kind, f), 'rb').read()
      assert data[:2] == b'\xff\xd8'  # a JPEG
      sizes.add(tuple(tf.io.decode_jpeg(data).shape[:2]))
  assert len(sizes) > 10                          # several sizes
  assert len({h / w for h, w in sizes}) >= 3      # and aspect ratios
  # A second call finds the dataset and does not regenerate it.
  mtime = os.path.getmtime(os.path.join(a, 'manifest.json'))
  builtin_data.ensure(a, 7, counts)
  assert os.path.getmtime(os.path.join(a, 'manifest.json')) == mtime


def test_a_partial_copy_removed_before_it_is_locked_is_made_again(
    tmp_path, monkeypatch):
  """Another process's clean-up may remove this one's new folder between
  its makedirs and its lock (as in a two-process job that makes the
  built-in dataset at once): the folder is made again, not an error."""
  real_open, removed = os.open, []

  def open_after_removal(path, *args, **kwargs):
    if not removed and '.partial-' in str(path):
      removed.append(path)
      shutil.rmtree(path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(builtin_data.os, 'open', open_after_removal)
  partial, lock = builtin_data._locked_partial(str(tmp_path / 'dataset'))
  os.close(lock)
  assert removed == [partial] and os.path.isdir(partial)


def test_builtin_dataset_removes_abandoned_copies_not_those_being_written(
    tmp_path):
  # A copy whose process was killed holds no lock; one being written (here
  # by this test, as by a process on another host) does.
  abandoned = tmp_path / 'data.partial-otherhost-123'
  being_written = tmp_path / 'data.partial-otherhost-456'
  for partial in (abandoned, being_written):
    (partial / 'train' / 'star').mkdir(parents=True)
    (partial / 'train' / 'star' / '00000.jpg').write_bytes(b'half')
  lock = os.open(being_written, os.O_RDONLY)
  fcntl.flock(lock, fcntl.LOCK_EX)
  try:
    made = builtin_data.ensure(str(tmp_path / 'data'), 7,
                               {'train': 1, 'validation': 1})
  finally:
    os.close(lock)
  assert os.path.exists(os.path.join(made, 'manifest.json'))
  assert sorted(os.listdir(tmp_path)) == ['data', being_written.name]


def test_builtin_dataset_whose_drawing_fails_leaves_nothing(tmp_path):
  # A split name no folder can have makes one worker's os.makedirs fail.
  with pytest.raises(ValueError, match='null'):
    builtin_data.ensure(str(tmp_path / 'data'), 7,
                        {'train': 1, 'bad\0split': 1})
  assert os.listdir(tmp_path) == []


def test_train_batches_have_the_contract_shapes(tiny_config):
  src = sources.source(tiny_config, 'train')
  assert src.num_examples == 80 and len(src.class_names) == 10
  batch = next(stream.train_dataset(tiny_config, src)
               .as_numpy_iterator())
  assert batch['image'].shape == (16, 64, 64, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert batch['lighting'].shape == (16, 3)
  assert batch['flip'].shape == (16,) and batch['flip'].dtype == bool
  # The stream is the same on a second run with the same seed.
  again = next(stream.train_dataset(tiny_config, src)
               .as_numpy_iterator())
  np.testing.assert_array_equal(batch['image'], again['image'])


def test_eval_counts_every_example_once_with_a_padded_last_batch(tiny_config):
  src = sources.source(tiny_config, 'validation')
  batches = list(stream.eval_batches(tiny_config, src, 7))
  assert src.num_examples == 30
  assert len(batches) == 5                       # 7 + 7 + 7 + 7 + 2
  assert all(b['image'].shape[0] == 7 for b in batches)
  assert sum(b['mask'].sum() for b in batches) == 30
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0, 0, 0, 0])


def test_a_process_without_eval_examples_runs_the_others_steps_on_padding(
    tiny_config, monkeypatch):
  """3 examples over 4 processes: the last has none, and must still run as
  many (masked) steps as the others."""
  src = sources.source(tiny_config, 'validation')
  monkeypatch.setattr(sources.jax, 'process_count', lambda: 4)
  none = dataclasses.replace(src, examples=src.examples.take(0), num_local=0,
                             num_examples=3)
  batches = list(stream.eval_batches(tiny_config, none, 4))
  assert len(batches) == 1
  assert batches[0]['image'].shape == (1, 64, 64, 3)
  np.testing.assert_array_equal(batches[0]['mask'], [0])


def test_missing_folder_dataset_names_the_expected_layout(tiny_config,
                                                         tmp_path):
  tiny_config.dataset.name = f'folder:{tmp_path}/nothing'
  with pytest.raises(errors.DatasetError,
                     match='<split>/<class name>/<image files>'):
    sources.source(tiny_config, 'train')


def test_imagenet_without_archives_says_which_files_and_where(tiny_config,
                                                             tmp_path):
  tiny_config.dataset.name = 'imagenet2012'
  tiny_config.dataset.data_dir = str(tmp_path / 'tfds')
  tiny_config.dataset.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(errors.DatasetError,
                     match='ILSVRC2012_img_train.tar.*manual_dir'):
    sources.source(tiny_config, 'train')


def _batches(config, src, start_step, count):
  batches = stream.train_dataset(config, src, start_step)
  return [b for _, b in zip(range(count), batches.as_numpy_iterator())]


@pytest.mark.parametrize('read', ['random access', 'in order', 'in memory'])
def test_a_resumed_stream_continues_the_uninterrupted_one(tiny_config, read):
  src = sources.source(tiny_config, 'train')
  if read == 'in order':   # as a TFDS source reads: no lookup
    src = dataclasses.replace(src, lookup=None)
  if read == 'in memory':   # as the quickstart reads
    src = sources.decoded_in_memory(tiny_config, src)
  # 80 examples, 16 a batch: an epoch is 5 batches; resume inside epoch 0
  # and run on into epoch 1.
  whole = _batches(tiny_config, src, 0, 8)
  resumed = _batches(tiny_config, src, 3, 5)
  for want, got in zip(whole[3:], resumed):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # An epoch holds every example once (labels: 8 of each class), and the
  # next epoch comes in another order.
  epoch = np.concatenate([b['label'] for b in whole[:5]])
  np.testing.assert_array_equal(np.bincount(epoch), [8] * 10)
  assert not np.array_equal(
      epoch, np.concatenate([b['label'] for b in whole[5:]] +
                            [_batches(tiny_config, src, 8, 2)[0]['label'],
                             _batches(tiny_config, src, 9, 1)[0]['label']]))


def _squares(config, examples):
  """(256x256 images, labels) of (file bytes, label) examples."""
  pairs = list(examples.map(lambda data, label: (augment.paper_image(
      data, config.resize_size), label)).as_numpy_iterator())
  return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_an_epoch_order_mixes_the_classes_of_a_folder_in_class_order(
    tiny_config):
  """A folder lists its files class by class: consecutive examples of an
  epoch share a class about as often as chance has it (7 in 79 here), not
  in runs (TensorFlow's default 4 rounds of its shuffle: 0.16 over these
  seeds, 0.08-0.21 each)."""
  src = sources.source(tiny_config, 'train')
  assert src.num_examples == 80 and tiny_config.batch_size == 16
  same = []
  for seed in (0, 1, 2):
    tiny_config.seed = seed
    labels = np.concatenate([b['label'] for b in _batches(tiny_config, src,
                                                          0, 25)])
    same.append(np.mean(labels[1:] == labels[:-1]))   # 5 epochs
  # Chance: 0.089, with a standard error of 0.008 over the 1,197 pairs.
  assert np.mean(same) < 0.125, same


@pytest.mark.parametrize('random_access', [True, False])
def test_images_kept_decoded_in_memory_are_their_files_256_images(
    tiny_config, random_access):
  src = sources.source(tiny_config, 'validation')
  if not random_access:
    src = dataclasses.replace(src, lookup=None)
  tiny_config.dataset.decoded_in_memory = False
  assert sources.decoded_in_memory(tiny_config, src) is src
  tiny_config.dataset.decoded_in_memory = True   # as the quickstart has it
  kept = sources.decoded_in_memory(tiny_config, src)
  want_images, want_labels = _squares(tiny_config, src.examples)
  assert want_images.shape == (30, 73, 73, 3)
  images, labels = (np.stack(a) for a in zip(*kept.examples))
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  if random_access:   # the whole split by index, as a raw store holds it
    np.testing.assert_array_equal(kept.pixels.images, want_images)
    np.testing.assert_array_equal(kept.pixels.labels, want_labels)
  batches = list(stream.eval_batches(tiny_config, kept, 7))
  assert sum(b['mask'].sum() for b in batches) == 30
  # A process whose share of an in-order source is empty keeps nothing.
  empty = dataclasses.replace(src, examples=src.examples.take(0),
                              num_local=0, lookup=None)
  assert sources.decoded_in_memory(tiny_config, empty) is empty


def test_keeping_images_decoded_refuses_a_quarter_of_memory_or_more(
    tiny_config, monkeypatch):
  src = sources.source(tiny_config, 'train')  # 80 of 73x73x3 bytes
  monkeypatch.setattr(host, 'physical_memory',
                      lambda: 4 * 80 * 73 * 73 * 3 - 4)
  with pytest.raises(errors.DatasetError,
                     match=r'keep 80 images of 73x73 .* more than a quarter '
                           r'.*--config.dataset.decoded_in_memory=False'):
    sources.decoded_in_memory(tiny_config, src)
  monkeypatch.setattr(host, 'physical_memory',
                      lambda: 4 * 80 * 73 * 73 * 3)
  assert sources.decoded_in_memory(tiny_config, src).num_examples == 80


def _encode(array, fmt='JPEG', mode=None):
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buffer, format=fmt)
  return buffer.getvalue()


def test_bad_files_are_skipped_or_repaired_and_each_is_named(tiny_config,
                                                             tmp_path,
                                                             capsys):
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (120, 160, 3), np.uint8)
  files = {
      'good.jpeg': _encode(photo),
      'truncated.jpeg': _encode(photo)[:3000],
      'cmyk.jpeg': _encode(photo, mode='CMYK'),
      'grey.jpeg': _encode(photo, mode='L'),
      'png_named.JPEG': _encode(photo, fmt='PNG'),
      'tiny.jpeg': _encode(photo[:1, :2]),
      'huge.jpeg': _encode(np.zeros((3000, 4000, 3), np.uint8)),
      'garbage.jpeg': rng.bytes(4000),
      'empty.jpeg': b'',
      'header_then_garbage.jpeg': _encode(photo)[:600] + rng.bytes(9000),
  }
  for split in ('train', 'validation'):
    for name, data in files.items():
      folder = tmp_path / 'data' / split / 'thing'
      folder.mkdir(parents=True, exist_ok=True)
      (folder / name).write_bytes(data)
  tiny_config.dataset.name = f'folder:{tmp_path}/data'
  tiny_config.dataset.data_dir = str(tmp_path / 'cache')
  tiny_config.batch_size, tiny_config.eval.batch_size = 7, 4
  capsys.readouterr()
  src = sources.source(tiny_config, 'train')
  log = capsys.readouterr().err
  for name in ('garbage.jpeg', 'empty.jpeg', 'header_then_garbage.jpeg'):
    assert f'skipping {tmp_path}/data/train/thing/{name}' in log
  for name in ('truncated.jpeg', 'cmyk.jpeg', 'grey.jpeg', 'png_named.JPEG'):
    assert f'repaired {tmp_path}/data/train/thing/{name}' in log
  assert 'checked 10 files: 3 skipped, 4 repaired' in log
  assert src.num_local == 7
  # Two epochs of training and a whole evaluation go through.
  batches = _batches(tiny_config, src, 0, 2)
  assert all(b['image'].shape == (7, 64, 64, 3) for b in batches)
  # Screening recorded each usable file's height and width (in file order:
  # cmyk, good, grey, huge, png_named, tiny, truncated), and the crops found
  # from them a batch at a time are those found image by image.
  shapes = [(120, 160)] * 3 + [(3000, 4000), (120, 160), (1, 2), (120, 160)]
  np.testing.assert_array_equal(src.shapes, shapes)
  for got, want in zip(batches, _batches(
      tiny_config, dataclasses.replace(src, shapes=None), 0, 2)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  eval_src = sources.source(tiny_config, 'validation')
  masks = [b['mask'] for b in stream.eval_batches(
      tiny_config, eval_src, tiny_config.eval.batch_size)]
  assert sum(m.sum() for m in masks) == 7 and len(masks) == 2
  # The screening result is kept: a second look decodes nothing and logs
  # nothing.
  capsys.readouterr()
  again = sources.source(tiny_config, 'train')
  assert again.num_local == 7 and 'skipping' not in capsys.readouterr().err
  np.testing.assert_array_equal(again.shapes, shapes)


def test_the_train_stream_is_the_same_for_any_number_of_processes(
    tiny_config, monkeypatch):
  """Two processes' halves of each batch, put together, are the one-process
  batch: a run can move to more or fewer hosts and see the same data."""
  src = sources.source(tiny_config, 'train')
  one_process = _batches(tiny_config, src, 1, 3)
  halves = []
  monkeypatch.setattr(sources.jax, 'process_count', lambda: 2)
  for process in (0, 1):
    monkeypatch.setattr(sources.jax, 'process_index', lambda: process)
    halves.append(_batches(tiny_config, src, 1, 3))
  for whole, first, second in zip(one_process, *halves):
    assert first['image'].shape[0] == tiny_config.batch_size // 2
    for key in whole:
      np.testing.assert_array_equal(
          whole[key], np.concatenate([first[key], second[key]]))


def test_a_file_unreadable_once_is_tried_again_and_never_cached_as_bad(
    tmp_path, monkeypatch, capsys):
  """As after a chmod, which changes neither size nor time: the first look
  cannot read b.jpeg, the second can, and then it is used."""
  folder = tmp_path / 'data'
  folder.mkdir()
  rng = np.random.default_rng(0)
  paths = []
  for name, height in (('a.jpeg', 40), ('b.jpeg', 30), ('garbage.jpeg', 0)):
    data = (rng.bytes(500) if name == 'garbage.jpeg' else
            _encode(rng.integers(0, 256, (height, 50, 3), np.uint8)))
    (folder / name).write_bytes(data)
    paths.append(str(folder / name))
  unreadable = str(folder / 'b.jpeg')
  real_kinds = screening._screen_file_kinds
  monkeypatch.setattr(
      screening, '_screen_file_kinds',
      lambda ps: {i: k for i, k in real_kinds(ps).items()
                  if ps[i] != unreadable})
  monkeypatch.setattr(screening, '_unreadable',
                      lambda p: 'permission denied' if p == unreadable
                      else None)
  cache = str(tmp_path / 'cache')
  capsys.readouterr()
  assert screening.screen(paths, cache) == [(40, 50), None, None]
  log = capsys.readouterr().err
  assert f'warning: skipping {unreadable}: permission denied' in log
  assert f'skipping {paths[2]}: ' in log
  assert 'Unknown image file format' in log  # TF's reason, bare
  assert '{{' not in log and '[Op:' not in log

  monkeypatch.undo()  # readable again, nothing else changed
  assert screening.screen(paths, cache) == [(40, 50), (30, 50), None]
  assert 'b.jpeg' not in capsys.readouterr().err
  assert screening.screen(paths, cache) == [(40, 50), (30, 50), None]


def test_a_symlink_loop_and_a_dangling_link_are_skipped_with_their_reasons(
    tiny_config, tmp_path, capsys):
  rng = np.random.default_rng(1)
  for split in ('train', 'validation'):
    for label in ('a', 'b'):
      folder = tmp_path / 'data' / split / label
      folder.mkdir(parents=True)
      for i in range(3):
        (folder / f'{i}.jpeg').write_bytes(
            _encode(rng.integers(0, 256, (40, 50, 3), np.uint8)))
  train = tmp_path / 'data' / 'train'
  os.symlink('loop.jpeg', train / 'a' / 'loop.jpeg')
  os.symlink(str(tmp_path / 'gone.jpeg'), train / 'a' / 'dangling.jpeg')
  tiny_config.dataset.name = f'folder:{tmp_path}/data'
  tiny_config.dataset.data_dir = str(tmp_path / 'cache')
  capsys.readouterr()
  src = sources.source(tiny_config, 'train')
  log = capsys.readouterr().err
  assert src.num_examples == 6
  assert f'{train}/a/loop.jpeg: too many levels of symbolic links' in log
  assert f'{train}/a/dangling.jpeg: no such file or directory' in log


def test_a_torchvision_style_val_folder_is_the_evaluation_split(
    tiny_config, tmp_path):
  for split in ('train', 'val'):
    folder = tmp_path / 'data' / split / 'a'
    folder.mkdir(parents=True)
    (folder / '0.jpeg').write_bytes(
        _encode(np.zeros((40, 50, 3), np.uint8)))
  tiny_config.dataset.name = f'folder:{tmp_path}/data'
  tiny_config.dataset.data_dir = str(tmp_path / 'cache')
  assert sources.source(tiny_config, 'validation').num_examples == 1


def test_imagenet_is_built_through_tfds_from_archives_in_its_manual_folder(
    tiny_config, tmp_path, capsys):
  """Fake archives in image-net.org's layout, in TFDS's default manual
  folder: the ImageNet path of a fresh install, end to end (it once failed
  on an undeclared dependency of tensorflow-datasets). TFDS's progress bars
  come out as plain lines on stdout."""
  import fake_imagenet  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'tfds'
  fake_imagenet.write(str(data_dir / 'downloads' / 'manual'),
                      train_per_class=3, val_images=5)
  tiny_config.dataset.name = 'imagenet2012'
  tiny_config.dataset.data_dir = str(data_dir)
  tiny_config.progress_every_s = 0
  train = sources.source(tiny_config, 'train')
  shown = capsys.readouterr().out.splitlines()
  assert 'Generating train examples...: 9 examples' in '\n'.join(shown)
  assert any(line.startswith('Generating splits...: 100%|') for line in shown)
  assert not any('\r' in line or '\x1b' in line for line in shown)
  assert train.num_examples == 9 and len(train.class_names) == 1000
  labels = sorted(int(y) for _, y in train.examples.as_numpy_iterator())
  assert labels == sorted(
      [train.class_names.index(c) for c in fake_imagenet.CLASSES] * 3)
  assert sources.source(tiny_config, 'validation').num_examples == 5


def test_one_class_count_rule_for_training_and_for_looking_at_a_network(
    tiny_config):
  """A network with more outputs than the dataset has classes trains, and
  predict, figures and export name the extra outputs; fewer is refused."""
  tiny_config.model.num_classes = 12
  names = sources.output_names(tiny_config, builtin_data.CLASSES)
  assert names == builtin_data.CLASSES + ('class 10', 'class 11')
  tiny_config.model.num_classes = 9
  with pytest.raises(errors.DatasetError,
                     match='has 10 classes but model.num_classes is 9'):
    sources.output_names(tiny_config, builtin_data.CLASSES)
