"""Where the towers live and how they talk: the one place for cross-tower traffic.

The 2012 network ran as two towers, one per GPU, that exchanged activations
only before conv3, fc6, fc7 and fc8. Here the devices form a mesh with axes
('data', 'tower'): the batch is split over 'data', the towers over 'tower'.
`Towers` describes how many towers the network has, how many of them this
device holds, and the mesh axes they and the batch are spread over. The model
asks it for the activations of all towers (`gather`) and for global indices
(`global_index`, `example_ids`), so the same model code runs on one device or
inside `jax.shard_map` on any mesh.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import errors

DATA = 'data'
TOWER = 'tower'


@dataclasses.dataclass(frozen=True)
class Towers:
  """How the network's towers are placed.

  count: towers in the network (2 for the 2012 split, 1 otherwise).
  tower_axis, tower_axis_size: the mesh axis the towers are spread over,
    inside `shard_map`; None when this device holds every tower.
  data_axis: the mesh axis the batch is spread over, inside `shard_map`.
  """
  count: int = 1
  tower_axis: Optional[str] = None
  tower_axis_size: int = 1
  data_axis: Optional[str] = None

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
      # On a tower axis of size 1 this is a no-op that XLA removes.
      x = jax.lax.all_gather(x, self.tower_axis, axis=x.ndim - 1, tiled=True)
    return x

  def global_index(self, local_tower: int) -> jax.Array | int:
    """The index in the whole network of this device's `local_tower`."""
    if self.tower_axis is None:
      return local_tower
    return jax.lax.axis_index(self.tower_axis) * self.local + local_tower

  def example_ids(self, local_batch: int) -> jax.Array:
    """Indices in the global batch of this device's examples."""
    ids = jnp.arange(local_batch)
    if self.data_axis is None:
      return ids
    return jax.lax.axis_index(self.data_axis) * local_batch + ids


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'tower') mesh of config.mesh over the first devices needed.

  mesh.tower is 1 (both towers on each device) or 2 (one tower per device,
  as in 2012); mesh.data=-1 takes every device left.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, tower = config.mesh.data, config.mesh.tower
  if tower not in (1, 2):
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


def mesh_towers(tower_count: int, mesh: jax.sharding.Mesh) -> Towers:
  """How a network of `tower_count` towers is spread over `mesh`."""
  size = mesh.shape[TOWER]
  if tower_count % size:
    raise errors.UserError(
        f'the model has {tower_count} tower(s), which cannot be split over '
        f'mesh.tower={size}: set --config.mesh.tower=1')
  return Towers(count=tower_count, tower_axis=TOWER, tower_axis_size=size,
                data_axis=DATA)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, key: str) -> None:
  """A global batch must split evenly over the 'data' shards."""
  if batch_size % mesh.shape[DATA]:
    raise errors.UserError(
        f'{key}={batch_size} does not divide over {mesh.shape[DATA]} data '
        f'shards: make it a multiple of {mesh.shape[DATA]}')


def param_spec(path, per_tower_layers: frozenset[str]) -> P:
  """Per-tower parameters (and their gradients, momenta) split over 'tower'.

  Their leading axis is the tower axis. Every other leaf (fc8, the step, the
  RNG) is whole on every device.
  """
  if any(getattr(entry, 'key', None) in per_tower_layers for entry in path):
    return P(TOWER)
  return P()


def param_specs(tree, per_tower_layers: frozenset[str]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_spec(path, per_tower_layers), tree)


def shardings(tree, mesh: jax.sharding.Mesh,
              per_tower_layers: frozenset[str]) -> Any:
  """NamedShardings for a tree of parameters, optimizer or train state."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: NamedSharding(mesh, param_spec(path, per_tower_layers)),
      tree)


def shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh):
  """This process's part of a global batch, split over 'data'.

  Each process passes only its own examples; the result is one global array
  per entry, as multi-host training needs.
  """
  sharding = NamedSharding(mesh, P(DATA))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}
