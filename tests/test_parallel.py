"""The two-tower split over a ('data', 'tower') mesh of fake CPU devices."""

import re

import jax
import numpy as np
import pytest

from alexnet_jax import errors
from alexnet_jax import parallel
from alexnet_jax import train

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, size = config.batch_size, config.image_size
  return {
      'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      'label': rng.integers(0, config.model.num_classes, n).astype(np.int32),
      'lighting': rng.normal(0, 3, (n, 3)).astype(np.float32),
  }


def _train(config, data, tower, steps=3):
  config.mesh.data, config.mesh.tower = data, tower
  mesh = parallel.make_mesh(config)
  state = train.create_sharded_train_state(config, mesh)
  step = train.make_train_step(config, mesh, steps_per_epoch=100)
  losses = []
  for i in range(steps):
    state, metrics = step(state, parallel.shard_batch(_batch(config, i), mesh))
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
  state = train.create_sharded_train_state(tiny_config, mesh)
  kernel = state.params['conv2']['kernel']
  assert kernel.shape[0] == 2
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {1}
  momentum = jax.tree.leaves(state.opt_state)[0]
  assert momentum.sharding.spec == parallel.P(parallel.TOWER)
  fc8 = state.params['fc8']['kernel']
  assert fc8.sharding.is_fully_replicated


def _collectives(hlo: str):
  """(kind, result shape, replica groups, op name) of each collective."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r'= (\S+?)\{?[\d,]*\}? (all-gather|reduce-scatter|'
                  r'all-reduce|collective-permute|all-to-all)\(', line)
    if not m:
      continue
    groups = re.search(r'replica_groups=(\{[\d,{}]*\}|\S+)', line)
    name = re.search(r'op_name="([^"]*)"', line)
    found.append((m.group(2), m.group(1), groups.group(1) if groups else '',
                  name.group(1) if name else ''))
  return found


def test_compiled_step_has_exactly_the_2012_cross_tower_traffic(tiny_config):
  """Mesh (2, 2): devices [[0, 1], [2, 3]]; towers pair up as {0,1}, {2,3}.

  At 64 px and width 0.125, per device (8 examples): conv2's pooled maps are
  3x3x16 per tower, conv5's 1x1x16, fc6's and fc7's outputs 256.
  """
  tiny_config.mesh.data, tiny_config.mesh.tower = 2, 2
  mesh = parallel.make_mesh(tiny_config)
  state = train.create_sharded_train_state(tiny_config, mesh)
  step = train.make_train_step(tiny_config, mesh, steps_per_epoch=100)
  hlo = step.lower(state, parallel.shard_batch(_batch(tiny_config), mesh)
                   ).compile().as_text()
  collectives = _collectives(hlo)
  tower_groups, data_groups = '{{0,1},{2,3}}', '{{0,2},{1,3}}'

  gathers = sorted(shape for kind, shape, groups, _ in collectives
                   if kind == 'all-gather' and groups == tower_groups)
  # Before conv3, fc6, fc7 and fc8: both towers' activations on each device.
  assert gathers == sorted(['f32[8,3,3,32]', 'f32[8,1,1,32]', 'f32[8,512]',
                            'f32[8,512]']), collectives
  scatters = sorted(shape for kind, shape, groups, _ in collectives
                    if kind == 'reduce-scatter' and groups == tower_groups)
  # Their transposes: each tower gets back the gradient of its own part.
  assert scatters == sorted(['f32[8,3,3,16]', 'f32[8,1,1,16]', 'f32[8,256]',
                             'f32[8,256]']), collectives
  assert not any(kind == 'all-gather' and groups != tower_groups
                 for kind, _, groups, _ in collectives), collectives

  for kind, shape, groups, name in collectives:
    if kind in ('all-gather', 'reduce-scatter') or groups == data_groups:
      continue  # the tower traffic above, or gradient sums over 'data'
    # Anything else that crosses towers: fc8's gradient (fc8 is whole on
    # every device) or the loss and metric scalars.
    assert '/fc8/' in name or re.fullmatch(r'\(?(f32\[\](, )?)+\)?', shape), (
        kind, shape, groups, name)
  for layer in ('conv1', 'conv2', 'conv4', 'conv5'):
    assert not any(f'/{layer}/' in name and groups != data_groups
                   for _, _, groups, name in collectives), layer


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
    parallel.check_batch(16, parallel.make_mesh(tiny_config), 'batch_size')
