"""The two-tower split over a ('data', 'tower') mesh of fake CPU devices."""

import os
import re

import jax
import numpy as np
import pytest

from alexnet_jax.benchmark import compute
from alexnet_jax.model import parallel
from alexnet_jax.runtime import errors
from alexnet_jax.train import steps

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]


def _train(config, data, tower, count=3):
  config.mesh.data, config.mesh.tower = data, tower
  mesh = parallel.make_mesh(config)
  state = steps.create_sharded_train_state(config, mesh)
  step = steps.make_train_step(config, mesh, steps_per_epoch=100)
  losses = []
  for i in range(count):
    state, metrics = step(state, compute.random_batch(config, mesh, i))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params)


def _assert_close(actual, expected, rtol=1e-5):
  """Each leaf within rtol of the largest magnitude in the expected leaf."""
  def check(path, a, e):
    scale = float(np.max(np.abs(e)))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, actual, expected)


def test_every_mesh_trains_to_the_same_parameters(tiny_config):
  """Dropout on, 3 steps from one seed: the mesh shape changes nothing."""
  reference_losses, reference = _train(tiny_config, 1, 1)
  for data, tower in MESHES[1:]:
    losses, params = _train(tiny_config, data, tower)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5,
                               err_msg=f'mesh {data}x{tower}')
    _assert_close(params, reference)
  assert reference_losses[-1] != reference_losses[0]


def test_tower_parameters_and_momenta_are_split_over_the_tower_axis(
    tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.tower = 2, 2
  mesh = parallel.make_mesh(tiny_config)
  state = steps.create_sharded_train_state(tiny_config, mesh)
  kernel = state.params['conv2']['kernel']
  assert kernel.shape[0] == 2
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {1}
  momentum = jax.tree.leaves(state.opt_state)[0]
  assert momentum.sharding.spec == parallel.P(parallel.TOWER)
  fc8 = state.params['fc8']['kernel']
  assert fc8.sharding.is_fully_replicated


def _collectives(hlo: str):
  """(kind, result shapes, replica groups, op name) of each collective.

  XLA combines small collectives into one with a tuple of results, so the
  shapes come as a tuple: ('f32[8,512]',) or ('f32[3,3,8,16]', 'f32[16]').
  """
  found = []
  for line in hlo.splitlines():
    m = re.search(r'= (\([^()]*\)|\S+) (all-gather|reduce-scatter|'
                  r'all-reduce|collective-permute|all-to-all)(-start)?\(',
                  line)
    if not m:
      continue
    shapes = tuple(re.findall(r'[a-z]+\d*\[[\d,]*\]', m.group(1)))
    groups = re.search(r'replica_groups=(\{[\d,{}]*\}|\S+)', line)
    name = re.search(r'op_name="([^"]*)"', line)
    found.append((m.group(2), shapes, groups.group(1) if groups else '',
                  name.group(1) if name else ''))
  return found


def _compiled_train_step(config, data, tower) -> str:
  config.mesh.data, config.mesh.tower = data, tower
  mesh = parallel.make_mesh(config)
  state = steps.create_sharded_train_state(config, mesh)
  step = steps.make_train_step(config, mesh, steps_per_epoch=100)
  return step.lower(state, compute.random_batch(config, mesh)
                    ).compile().as_text()


def _shapes(collectives, kind, groups):
  return sorted(shape for k, shapes, g, _ in collectives
                if k == kind and g == groups for shape in shapes)


def _one_number(shape: str) -> bool:
  """Whether an HLO shape such as 'f32[]' or 'f32[1,1]' holds one number."""
  return re.fullmatch(r'\w+\[(1,)*1?\]', shape) is not None


def _gradient_sums(collectives) -> dict[str, set[str]]:
  """The layers whose gradients each group of devices sums (all-reduce)."""
  layers = {}
  for kind, shapes, groups, name in collectives:
    if kind == 'all-reduce' and not all(map(_one_number, shapes)):
      layers.setdefault(groups, set()).update(
          re.findall(r'(?:^|[/(:])((?:conv|fc)\d)/', name))
  return layers


# Mesh (2, 2) holds devices [[0, 1], [2, 3]].
TOWER_GROUPS, DATA_GROUPS, ALL = '{{0,1},{2,3}}', '{{0,2},{1,3}}', '{{0,1,2,3}}'


def _assert_traffic(collectives, gathers, scatters, gradient_sums):
  """Exactly these all-gathers and reduce-scatters, all within the tower
  groups; these layers' gradients summed by these groups; else scalars."""
  assert _shapes(collectives, 'all-gather', TOWER_GROUPS) == sorted(
      gathers), collectives
  assert _shapes(collectives, 'reduce-scatter', TOWER_GROUPS) == sorted(
      scatters), collectives
  assert not any(kind in ('all-gather', 'reduce-scatter')
                 and groups != TOWER_GROUPS
                 for kind, _, groups, _ in collectives), collectives
  assert _gradient_sums(collectives) == gradient_sums, collectives
  assert not any(kind not in ('all-gather', 'reduce-scatter', 'all-reduce')
                 for kind, _, _, _ in collectives), collectives


def test_compiled_step_has_exactly_the_2012_cross_tower_traffic(tiny_config):
  """Towers pair up as {0,1} and {2,3}.

  At 64 px and width 0.125, per device (8 examples): conv2's pooled maps are
  3x3x16 per tower, conv5's 1x1x16, fc6's and fc7's outputs 256.
  """
  _assert_traffic(
      _collectives(_compiled_train_step(tiny_config, 2, 2)),
      # Before conv3, fc6, fc7 and fc8: both towers' activations on each
      # device; in the backward pass, their transposes: each tower gets back
      # the gradient of its own part.
      gathers=['f32[8,3,3,32]', 'f32[8,1,1,32]', 'f32[8,512]', 'f32[8,512]'],
      scatters=['f32[8,3,3,16]', 'f32[8,1,1,16]', 'f32[8,256]', 'f32[8,256]'],
      # Each tower's layers summed over 'data' only; fc8, whole on every
      # device, over all of them.
      gradient_sums={DATA_GROUPS: {'conv1', 'conv2', 'conv3', 'conv4',
                                   'conv5', 'fc6', 'fc7'},
                     ALL: {'fc8'}})


def test_compiled_hybrid_step_has_exactly_the_2014_traffic(tiny_config):
  """One weird trick on mesh (2, 2): the fc layers split over {0,1}, {2,3}.

  16 examples, 4 per device in the convolutions; at width 0.125 conv5's
  pooled maps are 1x1x32, fc6 and fc7 have 512 units, fc8 10 (256 and 5 per
  device).
  """
  tiny_config.model.variant = 'one_tower_2014'
  tiny_config.mesh.fc_model_parallel = True
  collectives = _collectives(_compiled_train_step(tiny_config, 2, 2))
  _assert_traffic(
      collectives,
      # Forward: the group's 8 examples before fc6, every unit after fc6-fc8.
      # Backward: each device gets the gradient of its examples and units.
      gathers=['f32[8,1,1,32]', 'f32[8,512]', 'f32[8,512]', 'f32[8,10]'],
      scatters=['f32[4,1,1,32]', 'f32[8,256]', 'f32[8,256]', 'f32[8,5]'],
      # Convolutions data-parallel over all devices; fc shards over 'data'.
      gradient_sums={ALL: {'conv1', 'conv2', 'conv3', 'conv4', 'conv5'},
                     DATA_GROUPS: {'fc6', 'fc7', 'fc8'}})
  fc_gradient_shapes = [shapes for kind, shapes, groups, _ in collectives
                        if kind == 'all-reduce' and groups == DATA_GROUPS
                        and len(shapes) > 1]
  assert fc_gradient_shapes == [('f32[1,256]', 'f32[32,256]', 'f32[1,256]',
                                 'f32[512,256]', 'f32[1,5]', 'f32[512,5]')]


@pytest.mark.parametrize('variant, hybrid', [('paper_2012', False),
                                             ('one_tower_2014', True)])
def test_one_device_compiles_no_traffic_but_scalars(tiny_config, variant,
                                                    hybrid):
  """XLA:CPU keeps a collective over one device as a copy (an all-reduce of
  every gradient, in the paper's step), so a one-device mesh has none but
  scalar ones."""
  tiny_config.model.variant = variant
  tiny_config.mesh.fc_model_parallel = hybrid
  collectives = _collectives(_compiled_train_step(tiny_config, 1, 1))
  assert all(_one_number(shape)
             for _, shapes, _, _ in collectives for shape in shapes), (
                 collectives)


def test_hybrid_trains_to_the_parameters_of_one_device(tiny_config):
  """The 2014 hybrid on any mesh: the same as plain training on one device."""
  tiny_config.model.variant = 'one_tower_2014'
  tiny_config.model.num_classes = 8   # splits over 4 devices, as do 512 units
  reference_losses, reference = _train(tiny_config, 1, 1)
  tiny_config.mesh.fc_model_parallel = True
  for data, tower in [(1, 2), (2, 2), (1, 4), (2, 4)]:
    losses, params = _train(tiny_config, data, tower)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5,
                               err_msg=f'mesh {data}x{tower}')
    _assert_close(params, reference)
  assert reference_losses[-1] != reference_losses[0]


def test_hybrid_parameters_are_split_by_output_unit(tiny_config):
  tiny_config.model.variant = 'one_tower_2014'
  tiny_config.mesh.fc_model_parallel = True
  tiny_config.mesh.data, tiny_config.mesh.tower = 1, 2
  mesh = parallel.make_mesh(tiny_config)
  state = steps.create_sharded_train_state(tiny_config, mesh)
  fc6 = state.params['fc6']['kernel']
  assert fc6.shape == (1, 32, 512)
  assert {s.data.shape for s in fc6.addressable_shards} == {(1, 32, 256)}
  assert state.params['conv2']['kernel'].sharding.is_fully_replicated
  # The momenta are split like the parameters.
  fc8_kernel_momenta = [
      leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
          state.opt_state)
      if "'fc8'" in jax.tree_util.keystr(path) and leaf.ndim == 2]
  assert fc8_kernel_momenta
  assert all(m.sharding.spec == parallel.P(None, parallel.TOWER)
             for m in fc8_kernel_momenta)


def test_the_hybrid_refuses_two_towers_and_units_that_do_not_split(
    tiny_config):
  tiny_config.mesh.fc_model_parallel = True
  tiny_config.mesh.data, tiny_config.mesh.tower = 1, 2
  with pytest.raises(errors.UserError, match='one-tower networks'):
    steps.mesh_towers(tiny_config, parallel.make_mesh(tiny_config))
  tiny_config.model.variant = 'one_tower_2014'
  tiny_config.mesh.data, tiny_config.mesh.tower = 1, 4   # 10 classes
  with pytest.raises(errors.UserError, match='10 units .* mesh.tower=4'):
    steps.create_sharded_train_state(tiny_config,
                                     parallel.make_mesh(tiny_config))


@pytest.mark.parametrize('data, tower, message', [
    (1, 3, 'mesh.tower=3'),
    (8, 2, 'needs 16 devices'),
])
def test_impossible_meshes_are_refused(tiny_config, data, tower, message):
  tiny_config.mesh.data, tiny_config.mesh.tower = data, tower
  with pytest.raises(errors.UserError, match=message):
    parallel.make_mesh(tiny_config)


def test_data_minus_one_takes_the_remaining_devices(tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.tower = -1, 2
  assert dict(parallel.make_mesh(tiny_config).shape) == {'data': 4, 'tower': 2}


def test_a_batch_that_does_not_split_over_data_is_refused(tiny_config):
  tiny_config.mesh.data = 3
  with pytest.raises(errors.UserError, match='multiple of 3'):
    mesh = parallel.make_mesh(tiny_config)
    parallel.check_batch(16, mesh, steps.mesh_towers(tiny_config, mesh),
                         'batch_size')


def test_hybrid_evaluation_sums_match_one_device(tiny_config):
  """10 crops per example, batch split over (data, tower): the same sums."""
  tiny_config.model.variant = 'one_tower_2014'
  tiny_config.mesh.fc_model_parallel = True
  rng = np.random.default_rng(2)
  batch = {'image': rng.integers(0, 256, (8, 10, 64, 64, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 8).astype(np.int32),
           'mask': np.asarray([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}
  params = jax.device_get(steps.create_sharded_train_state(
      tiny_config, parallel.make_mesh(tiny_config)).params)
  sums = []
  for data, tower in [(1, 1), (2, 2)]:
    tiny_config.mesh.data, tiny_config.mesh.tower = data, tower
    mesh = parallel.make_mesh(tiny_config)
    eval_step = steps.make_eval_step(tiny_config, mesh)
    sums.append(jax.device_get(eval_step((params,), parallel.shard_batch(
        batch, mesh, steps.mesh_towers(tiny_config, mesh)))))
  assert float(sums[0]['count']) == 6
  for key in sums[0]:
    np.testing.assert_allclose(sums[1][key], sums[0][key], rtol=1e-5)


@pytest.mark.parametrize('name', ['quickstart', 'ilsvrc2012', 'paper_2012',
                                  'released_2012', 'one_tower_2014',
                                  'torchvision'])
def test_each_shipped_config_fits_1_2_4_and_8_devices(name):
  """The mesh, the towers and both batch sizes, as a run on that many
  devices sets them up (the network itself is tested on meshes above)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      name, f'{os.path.dirname(__file__)}/../configs/{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for count in (1, 2, 4, 8):
    mesh = parallel.make_mesh(config, jax.devices()[:count])
    assert mesh.size == count
    towers = steps.mesh_towers(config, mesh)
    parallel.check_batch(config.batch_size, mesh, towers, 'batch_size')
    eval_batch = parallel.padded_batch(config.eval.batch_size, mesh, towers)
    parallel.check_batch(eval_batch, mesh, towers, 'eval.batch_size')
    assert 0 <= eval_batch - config.eval.batch_size < count


def test_evaluation_pads_a_batch_that_does_not_split_and_counts_each_once(
    tiny_config):
  """eval.batch_size 7 on 4 data shards: batches of 8, the same metrics."""
  from alexnet_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  tiny_config.eval.batch_size = 7
  src = sources.source(tiny_config, 'validation')
  results = []
  for data in (1, 4):
    tiny_config.mesh.data = data
    mesh = parallel.make_mesh(tiny_config)
    state = steps.create_sharded_train_state(tiny_config, mesh)
    results.append(evaluation.evaluate_params(
        tiny_config, mesh, steps.make_eval_step(tiny_config, mesh),
        (state.params,), src))
  one, four = results
  assert one['examples'] == four['examples'] == 30
  for key in ('loss', 'top1_error', 'top5_error'):
    assert four[key] == pytest.approx(one[key], rel=1e-5)


def test_device_batches_go_onto_the_mesh_two_ahead_in_order(tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.tower = 2, 2
  mesh = parallel.make_mesh(tiny_config)
  towers = steps.mesh_towers(tiny_config, mesh)
  made = [compute.random_host_batch(tiny_config, tiny_config.batch_size,
                                      seed) for seed in range(4)]
  pulled = []

  def source():
    for batch in made:
      pulled.append(batch)
      yield batch

  batches = parallel.device_batches(source(), mesh, towers)
  first = next(batches)
  assert len(pulled) == 3   # the next two are already on their way
  out = [first, *batches]
  assert len(out) == 4
  for batch, expected in zip(out, made):
    assert batch['image'].sharding.spec == jax.sharding.PartitionSpec(
        towers.batch_axes)
    for key, value in expected.items():
      np.testing.assert_array_equal(jax.device_get(batch[key]), value)
