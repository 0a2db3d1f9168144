"""Looking at a network: the figures' drawing, predict, figures and export."""

import glob
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

import command_line
from command_line import checkpointed_params
from command_line import run_main
from command_line import tiny_flags
from alexnet_jax.data import augment
from alexnet_jax.data import builtin_data
from alexnet_jax.data import device_preprocessing
from alexnet_jax.data import sources
from alexnet_jax.model import alexnet
from alexnet_jax.model import parallel
from alexnet_jax.tools import figures
from alexnet_jax.tools import inference
from alexnet_jax.train import steps


def test_the_kernel_grid_holds_each_kernel_tower_by_tower():
  rng = np.random.default_rng(0)
  kernels = rng.normal(0, 0.02, (2, 11, 11, 3, 20)).astype(np.float32)
  grid = figures.conv1_grid(kernels)
  side = 11 * figures.KERNEL_ZOOM
  for tower in range(2):
    for index in range(20):
      top, left = figures.kernel_cell(tower, index, 11, 20)
      cell = grid[top:top + side, left:left + side]
      # Each screen pixel block is one kernel pixel, scaled to 0-255.
      kernel = kernels[tower, ..., index]
      want = np.round((kernel - kernel.min()) / (kernel.max() - kernel.min())
                      * 255)
      np.testing.assert_array_equal(
          cell[::figures.KERNEL_ZOOM, ::figures.KERNEL_ZOOM], want)
  # Tower 1's block starts below all of tower 0's rows (20 kernels: 2 rows).
  assert figures.kernel_cell(1, 0, 11, 20)[0] > figures.kernel_cell(
      0, 19, 11, 20)[0] + side


def test_nearest_are_the_nearest_by_comparing_every_pair():
  rng = np.random.default_rng(1)
  queries, pool = rng.normal(size=(4, 32)), rng.normal(size=(300, 32))
  order, distances = figures.nearest(queries, pool, 6)
  for q in range(4):
    every = np.asarray([np.linalg.norm(queries[q] - p) for p in pool])
    np.testing.assert_array_equal(order[q], np.argsort(every)[:6])
    np.testing.assert_allclose(distances[q], np.sort(every)[:6], rtol=1e-9)


def test_a_prediction_panel_draws_bars_as_long_as_the_probabilities():
  image = np.zeros((64, 64, 3), np.uint8)
  panel = figures.prediction_panel(
      image, 'star', [['plus', 0.5], ['star', 0.25], ['ring', 0.125],
                      ['arrow', 0.0625], ['heart', 0.0625]])
  def bar_length(rank, colour):
    """Up to the bar's last pixel of `colour` (the class name covers some)."""
    top = figures.TILE + 16 + rank * figures.BAR_HEIGHT
    rows = panel[top:top + figures.BAR_HEIGHT]
    columns = np.flatnonzero(np.any(np.all(rows == colour, axis=-1), axis=0))
    return int(columns.max()) + 1 if columns.size else 0
  assert bar_length(0, figures._OTHER) == round(0.5 * (figures.TILE - 1)) + 1
  assert bar_length(1, figures._TRUE) == round(0.25 * (figures.TILE - 1)) + 1
  assert bar_length(1, figures._OTHER) == 0
  # Each bar's probability is written right of the bars' room.
  numbers = panel[figures.TILE + 16:, figures.TILE:]
  assert (numbers < 128).any()


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('looked_at') / 'run')
  run_main(*tiny_flags(data_dir), f'--workdir={workdir}')
  return workdir, checkpointed_params(workdir, 4)


def _split_files(config, split):
  """The split's files in the order of the dataset's indices: by class (in
  the dataset's class order), then by name."""
  root = os.path.join(builtin_data.settings(config)[0], split)
  return [path for name in sources.class_names(config)
          for path in sorted(glob.glob(os.path.join(root, name, '*.jpg')))]


def _eval_files(config, count):
  files = _split_files(config, 'validation')
  return files[::len(files) // count][:count]


def _crops(config, files):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return np.stack([augment.eval_example(augment.Crops.of(config), tf.io.read_file(f), 0)[
      'image'].numpy() for f in files])


def test_predict_gives_the_probabilities_of_the_eval_step(trained, data_dir,
                                                          tmp_path):
  """10 crops each: -log of predict's top probability is eval_step's loss
  for that class as label. Files and a folder, more than one batch (7)."""
  workdir, params = trained
  config = command_line.tiny_config(data_dir)
  config.eval.crops = 10
  named = _eval_files(config, 9)
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, path in enumerate(named[4:]):
    (folder / f'{i}.jpg').write_bytes(open(path, 'rb').read())
  files = named[:4] + [str(folder / f'{i}.jpg') for i in range(5)]
  result = run_main(*tiny_flags(data_dir), '--config.eval.crops=10',
                    f'--workdir={workdir}', '--mode=predict',
                    f'--images={",".join(named[:4])},{folder}')
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [line['image'] for line in lines] == files
  names = sources.class_names(config)
  for line in lines:
    assert line['step'] == 4 and len(line['top5']) == 5
    probabilities = [p for _, p in line['top5']]
    assert probabilities == sorted(probabilities, reverse=True)
    assert {name for name, _ in line['top5']} <= set(names)

  mesh = parallel.make_mesh(config)
  eval_step = steps.make_eval_step(config, mesh)
  top = np.asarray([names.index(line['top5'][0][0]) for line in lines],
                   np.int32)
  sums = eval_step((params,), parallel.shard_batch(
      {'image': _crops(config, files), 'label': top,
       'mask': np.ones(len(files), np.float32)},
      mesh, steps.mesh_towers(config, mesh)))
  want = -np.sum(np.log([line['top5'][0][1] for line in lines]))
  assert float(sums['loss']) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_predict_skips_files_that_are_not_images_and_names_them(
    trained, data_dir, tmp_path):
  """A text file named .jpg is left out with its reason and the rest are
  predicted; a truncated JPEG is predicted and named as repaired; nothing
  readable at all is one error line."""
  workdir, _ = trained
  config = command_line.tiny_config(data_dir)
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, path in enumerate(_eval_files(config, 3)):
    (folder / f'{i}.jpg').write_bytes(open(path, 'rb').read())
  data = (folder / '0.jpg').read_bytes()
  (folder / 'cut.jpg').write_bytes(data[:len(data) // 2])
  bad = folder / 'fake.jpg'
  bad.write_text('not a picture')
  result = run_main(*tiny_flags(data_dir), f'--workdir={workdir}',
                    '--mode=predict', f'--images={folder}')
  predicted = [json.loads(line)['image'] for line in result.stdout.splitlines()
               if line.startswith('{')]
  assert predicted == [str(folder / name)
                       for name in ('0.jpg', '1.jpg', '2.jpg', 'cut.jpg')]
  assert f'warning: skipping {bad}: ' in result.stderr
  assert f'warning: repaired {folder / "cut.jpg"}: truncated JPEG' in (
      result.stderr)

  only_bad = run_main(*tiny_flags(data_dir), f'--workdir={workdir}',
                      '--mode=predict', f'--images={bad}', check=False)
  assert only_bad.returncode == 1
  last = only_bad.stderr.strip().splitlines()[-1]
  assert last.startswith('error: none of the 1 files given can be read')


def test_figures_show_the_kernels_and_the_true_nearest_neighbours(
    trained, data_dir):
  workdir, params = trained
  run_main(*tiny_flags(data_dir), f'--workdir={workdir}', '--mode=figures',
           '--figure_pool=40')
  out = os.path.join(workdir, 'figures')
  figure = np.asarray(Image.open(os.path.join(out, 'conv1_kernels.png')))
  grid = figures.conv1_grid(params['conv1']['kernel'])
  # The grid under its title, right of the towers' labels, which are there.
  np.testing.assert_array_equal(
      figure[figures.HEADER:, figures.LABEL_WIDTH:], grid)
  assert (figure[:figures.HEADER] < 128).any()          # the title
  assert (figure[figures.HEADER:, :figures.LABEL_WIDTH] < 128).any()
  with open(os.path.join(out, 'figures.json')) as f:
    numbers = json.load(f)
  assert len(numbers['predictions']) == figures.PREDICTION_IMAGES
  # Two rows of four panels, 4 pixels apart.
  panel_height = figures.TILE + 16 + 5 * figures.BAR_HEIGHT
  assert Image.open(os.path.join(out, 'predictions.png')).size == (
      4 * (figures.TILE + figures.NUMBER_WIDTH + 4) + 4,
      figures.HEADER + 2 * (panel_height + 4) + 4)

  # fc7 of every pool image and query, recomputed here; compare each pair.
  config = command_line.tiny_config(data_dir)
  model = alexnet.build(config)
  fc7_of = jax.jit(lambda images: inference.fc7_features(
      model, params, images, config.dataset.mean_rgb))
  fc7 = lambda images: np.asarray(fc7_of(images))
  train_files = _split_files(config, 'train')
  assert numbers['pool_size'] == 40
  pool_indices = np.unique(np.linspace(0, len(train_files) - 1, 40,
                                       dtype=np.int64))
  pool_crops = _crops(config, [train_files[i] for i in pool_indices])
  pool = fc7(pool_crops)
  # fc7_features checked through the layer after it: fc8 of the features,
  # halved (the paper's dropout at test time), gives the network's logits.
  logits = jax.jit(model.apply)({'params': params}, device_preprocessing.normalize(
      pool_crops, config.dataset.mean_rgb))
  np.testing.assert_allclose(
      0.5 * pool @ params['fc8']['kernel'] + params['fc8']['bias'], logits,
      rtol=1e-4, atol=1e-4)
  eval_files = _split_files(config, 'validation')
  assert len(numbers['neighbours']) == figures.QUERIES
  for query in numbers['neighbours']:
    feature = fc7(_crops(config, [eval_files[query['eval_index']]]))[0]
    distances = np.asarray([np.linalg.norm(feature - p) for p in pool])
    nearest = np.argsort(distances)[:figures.NEIGHBOURS]
    assert [n['train_index'] for n in query['nearest']] == list(
        pool_indices[nearest])
    np.testing.assert_allclose([n['distance'] for n in query['nearest']],
                               distances[nearest], rtol=1e-3, atol=1e-3)


def test_the_exported_saved_model_gives_the_jax_probabilities(trained,
                                                              data_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, params = trained
  run_main(*tiny_flags(data_dir), f'--workdir={workdir}', '--mode=export')
  export_dir = os.path.join(workdir, 'saved_model')
  config = command_line.tiny_config(data_dir)
  with open(os.path.join(export_dir, 'class_names.txt')) as f:
    assert tuple(f.read().split()) == sources.class_names(config)
  images = _crops(config, _eval_files(config, 6))
  serve = tf.saved_model.load(export_dir).signatures['serving_default']
  exported = serve(images=tf.constant(images))['probabilities'].numpy()
  want = np.asarray(steps.mean_probabilities(
      alexnet.build(config), (params,), images, config.dataset.mean_rgb))
  assert exported.shape == (6, 10)
  np.testing.assert_allclose(exported, want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(want, want[:1])  # the images do differ


def test_training_writes_the_kernels_and_predictions_to_tensorboard(
    trained):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  tags = {value.tag
          for path in glob.glob(os.path.join(workdir, 'tensorboard', 'eval_*',
                                             '*'))
          for event in tf.compat.v1.train.summary_iterator(path)
          for value in event.summary.value}
  assert {'conv1_kernels', 'predictions'} <= tags
