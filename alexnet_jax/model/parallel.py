"""Where the towers live and how they talk: every collective is written here.

The 2012 network ran as two towers, one per GPU, that exchanged activations
only before conv3, fc6, fc7 and fc8. Here the devices form a mesh with axes
('data', 'tower'): the batch is split over 'data', the towers over 'tower'.

The 2014 hybrid ("One weird trick for parallelizing convolutional neural
networks") uses the same mesh differently: the convolutions are
data-parallel over every device, and the fully connected layers are split by
output unit over 'tower', each device computing its units for the whole
batch of its 'tower' group.

`Towers` describes how many towers the network has, how many of them this
device holds, and the mesh axes they, the batch and the fully connected units
are spread over. The model asks it for the activations of all towers
(`gather`), of the whole group's batch (`fc_inputs`), of all units
(`fc_outputs`) and for global indices (`global_index`, `example_ids`), so the
same model code runs on one device or inside `jax.shard_map` on any mesh.
"""

import collections
from collections.abc import Iterator
import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.runtime import errors

DATA = 'data'
TOWER = 'tower'


@dataclasses.dataclass(frozen=True)
class Towers:
  """How the network's towers are placed.

  count: towers in the network (2 for the 2012 split, 1 otherwise).
  tower_axis, tower_axis_size: the mesh axis the towers are spread over,
    inside `shard_map`; None when this device holds every tower.
  data_axis: the mesh axis the batch is spread over, inside `shard_map`;
    None when it has one device.
  fc_axis, fc_axis_size: the 2014 hybrid's axis, inside `shard_map`: the
    convolutions' batch is split over it too, the fully connected layers'
    output units are split over it instead. None: no hybrid, or a hybrid
    axis of one device.
  """
  count: int = 1
  tower_axis: Optional[str] = None
  tower_axis_size: int = 1
  data_axis: Optional[str] = None
  fc_axis: Optional[str] = None
  fc_axis_size: int = 1

  def __post_init__(self):
    if self.count % self.tower_axis_size:
      raise ValueError(f'{self.count} towers cannot be spread over a tower '
                       f'axis of size {self.tower_axis_size}')

  @property
  def local(self) -> int:
    """Towers held by this device."""
    return self.count // self.tower_axis_size

  def gather(self, xs: list[jax.Array]) -> jax.Array:
    """The activations of every tower, concatenated along channels.

    xs holds this device's towers' activations, in tower order.
    """
    x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
    if self.tower_axis is not None:
      x = jax.lax.all_gather(x, self.tower_axis, axis=x.ndim - 1, tiled=True)
    return x

  @property
  def batch_axes(self) -> tuple[str, ...]:
    """The mesh axes the input batch is split over."""
    return tuple(a for a in (self.data_axis, self.fc_axis) if a is not None)

  def fc_units(self, features: int) -> int:
    """How many of a fully connected layer's `features` this device computes."""
    if features % self.fc_axis_size:
      raise errors.UserError(
          f'a fully connected layer of {features} units cannot be split over '
          f'mesh.tower={self.fc_axis_size}: choose a mesh.tower that divides '
          f'{features}')
    return features // self.fc_axis_size

  def fc_inputs(self, x: jax.Array) -> jax.Array:
    """Before fc6 in the hybrid: the features of every example in the group."""
    if self.fc_axis is None:
      return x
    return jax.lax.all_gather(x, self.fc_axis, axis=0, tiled=True)

  def fc_outputs(self, y: jax.Array) -> jax.Array:
    """After a fully connected layer in the hybrid: every device's units."""
    if self.fc_axis is None:
      return y
    return jax.lax.all_gather(y, self.fc_axis, axis=y.ndim - 1, tiled=True)

  def own_examples(self, y: jax.Array) -> jax.Array:
    """The rows of the group's batch that this device's input held."""
    if self.fc_axis is None:
      return y
    n = y.shape[0] // self.fc_axis_size
    return jax.lax.dynamic_slice_in_dim(
        y, jax.lax.axis_index(self.fc_axis) * n, n, axis=0)

  def global_index(self, local_tower: int) -> jax.Array | int:
    """The index in the whole network of this device's `local_tower`."""
    if self.tower_axis is None:
      return local_tower
    return jax.lax.axis_index(self.tower_axis) * self.local + local_tower

  def example_ids(self, local_batch: int) -> jax.Array:
    """Indices in the global batch of this device's examples.

    In the hybrid, called on the fully connected layers' batch: the whole
    'tower' group's, which is one contiguous block of the global batch.
    """
    ids = jnp.arange(local_batch)
    if self.data_axis is None:
      return ids
    return jax.lax.axis_index(self.data_axis) * local_batch + ids


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'tower') mesh of config.mesh over the first devices needed.

  mesh.tower is 1 (both towers on each device) or 2 (one tower per device,
  as in 2012); with mesh.fc_model_parallel it is the number of devices the
  fully connected layers are split over. mesh.data=-1 takes every device left.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, tower = config.mesh.data, config.mesh.tower
  if config.mesh.fc_model_parallel:
    if tower < 1:
      raise errors.UserError(f'mesh.tower={tower}: use the number of devices '
                             f'to split the fully connected layers over')
  elif tower not in (1, 2):
    raise errors.UserError(f'mesh.tower={tower}: use 1 (both towers on each '
                           f'device) or 2 (one tower per device)')
  if data == -1:
    data = max(1, len(devices) // tower)
  if data < 1 or data * tower > len(devices):
    raise errors.UserError(
        f'mesh.data={config.mesh.data} x mesh.tower={tower} needs {data * tower}'
        f' devices but {len(devices)} are available: set --config.mesh.data')
  return jax.make_mesh((data, tower), (DATA, TOWER),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices[:data * tower])


def mesh_towers(tower_count: int, mesh: jax.sharding.Mesh,
                fc_model_parallel: bool = False) -> Towers:
  """How a network of `tower_count` towers is spread over `mesh`.

  fc_model_parallel: the 2014 hybrid, for one-tower networks; 'tower' then
  splits the batch of the convolutions and the units of fc6, fc7 and fc8.
  """
  size = mesh.shape[TOWER]
  # An axis of one device is left unnamed, so nothing is gathered or summed
  # over it: XLA:CPU keeps such collectives as copies (on one device, a copy
  # of every gradient at each step).
  named = lambda axis: axis if mesh.shape[axis] > 1 else None
  if fc_model_parallel:
    if tower_count != 1:
      raise errors.UserError(
          f'mesh.fc_model_parallel is the 2014 hybrid for one-tower networks; '
          f'this model has {tower_count} towers, whose fc layers mesh.tower '
          f'already splits: set --config.mesh.fc_model_parallel=False')
    return Towers(count=1, data_axis=named(DATA), fc_axis=named(TOWER),
                  fc_axis_size=size)
  if tower_count % size:
    raise errors.UserError(
        f'the model has {tower_count} tower(s), which cannot be split over '
        f'mesh.tower={size}: set --config.mesh.tower=1, or '
        f'--config.mesh.fc_model_parallel=True for the 2014 hybrid')
  return Towers(count=tower_count, tower_axis=named(TOWER),
                tower_axis_size=size, data_axis=named(DATA))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, towers: Towers,
                key: str) -> None:
  """A global batch must split evenly over the devices that share it."""
  shards = math.prod(mesh.shape[a] for a in towers.batch_axes)
  if batch_size % shards:
    raise errors.UserError(
        f'{key}={batch_size} does not divide over {shards} data '
        f'shards: make it a multiple of {shards}')


def padded_batch(batch_size: int, mesh: jax.sharding.Mesh,
                 towers: Towers) -> int:
  """batch_size rounded up to split evenly over the devices that share it.

  For evaluation, where a batch holds any number of real examples (the rest
  are masked), so a config runs unchanged on any number of devices.
  """
  shards = math.prod(mesh.shape[a] for a in towers.batch_axes)
  return -(-batch_size // shards) * shards


def param_spec(path, leaf, towers: Towers, per_tower_layers: frozenset[str],
               fc_layers: frozenset[str]) -> P:
  """How one parameter (or its gradient, momentum) is split over the mesh.

  Per-tower parameters have a leading tower axis, split over 'tower'; in the
  hybrid, fully connected parameters have their output units (last axis)
  split over 'tower' instead. Every other leaf (fc8 of the towers, the
  hybrid's convolutions, the step, the RNG) is whole on every device.
  """
  layers = {getattr(entry, 'key', None) for entry in path}
  if towers.fc_axis is not None:
    if layers & fc_layers:
      return P(*[None] * (leaf.ndim - 1), towers.fc_axis)
  elif towers.tower_axis is not None and layers & per_tower_layers:
    return P(towers.tower_axis)
  return P()


def param_specs(tree, towers: Towers, per_tower_layers: frozenset[str],
                fc_layers: frozenset[str]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: param_spec(path, leaf, towers, per_tower_layers,
                                    fc_layers), tree)


def shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh,
                towers: Towers):
  """This process's part of a global batch, split over `towers.batch_axes`.

  Each process passes only its own examples; the result is one global array
  per entry, as multi-host training needs.
  """
  sharding = NamedSharding(mesh, P(towers.batch_axes))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def device_batches(batches: Iterator[dict[str, Any]], mesh: jax.sharding.Mesh,
                   towers: Towers, ahead: int = 2) -> Iterator[dict[str, Any]]:
  """`batches` put on the mesh `ahead` batches before the step that takes them.

  JAX dispatches a step and returns at once, so the copy of the batches
  queued here runs while the device computes (flax's prefetch_to_device).
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(shard_batch(batch, mesh, towers))
    if len(queue) > ahead:
      yield queue.popleft()
  yield from queue
