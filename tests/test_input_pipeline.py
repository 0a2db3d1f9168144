"""The built-in dataset and the tf.data paths that read it."""

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import builtin_data
from alexnet_jax import input_pipeline


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


def test_train_batches_have_the_contract_shapes(tiny_config):
  src = input_pipeline.source(tiny_config, 'train')
  assert src.num_examples == 80 and len(src.class_names) == 10
  batch = next(input_pipeline.train_dataset(tiny_config, src)
               .as_numpy_iterator())
  assert batch['image'].shape == (16, 64, 64, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert batch['lighting'].shape == (16, 3)
  # The stream is the same on a second run with the same seed.
  again = next(input_pipeline.train_dataset(tiny_config, src)
               .as_numpy_iterator())
  np.testing.assert_array_equal(batch['image'], again['image'])


def test_eval_counts_every_example_once_with_a_padded_last_batch(tiny_config):
  src = input_pipeline.source(tiny_config, 'validation')
  batches = list(input_pipeline.eval_batches(tiny_config, src))
  assert src.num_examples == 30
  assert len(batches) == 5                       # 7 + 7 + 7 + 7 + 2
  assert all(b['image'].shape[0] == 7 for b in batches)
  assert sum(b['mask'].sum() for b in batches) == 30
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0, 0, 0, 0])


def test_ten_crops_are_the_corners_centre_and_mirrors():
  image = tf.reshape(tf.range(8 * 8 * 3), (8, 8, 3))
  crops = input_pipeline.eval_crops(image, 4, 10).numpy()
  img = image.numpy()
  want = [img[0:4, 0:4], img[0:4, 4:8], img[4:8, 0:4], img[4:8, 4:8],
          img[2:6, 2:6]]
  want += [w[:, ::-1] for w in want]
  np.testing.assert_array_equal(crops, np.stack(want))
  np.testing.assert_array_equal(
      input_pipeline.eval_crops(image, 4, 1).numpy(), img[2:6, 2:6])


def test_missing_folder_dataset_names_the_expected_layout(tiny_config,
                                                         tmp_path):
  tiny_config.dataset.name = f'folder:{tmp_path}/nothing'
  with pytest.raises(input_pipeline.DatasetError,
                     match='<split>/<class name>/<image files>'):
    input_pipeline.source(tiny_config, 'train')


def test_imagenet_without_archives_says_which_files_and_where(tiny_config,
                                                             tmp_path):
  tiny_config.dataset.name = 'imagenet2012'
  tiny_config.dataset.data_dir = str(tmp_path / 'tfds')
  tiny_config.dataset.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(input_pipeline.DatasetError,
                     match='ILSVRC2012_img_train.tar.*manual_dir'):
    input_pipeline.source(tiny_config, 'train')
