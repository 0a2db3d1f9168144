"""Where the towers live and how they talk: the one place for cross-tower traffic.

The 2012 network ran as two towers, one per GPU, that exchanged activations
only before conv3, fc6, fc7 and fc8. `Towers` describes how many towers the
network has, how many of them this device holds, and the mesh axes (if any)
they and the batch are spread over. The model asks it for the activations of
all towers (`gather`) and for global indices (`global_index`,
`example_ids`), so the same model code runs on one device or on a mesh.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


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
    if self.tower_axis is not None and self.tower_axis_size > 1:
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
