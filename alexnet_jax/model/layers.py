"""The paper's layers that Flax does not have: LRN, the same-map norm and
overlapping max pooling with cuda-convnet's backward pass.

Each works on one tower's maps (NHWC); `alexnet.py` applies them per tower.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LRN:
  """Local response normalisation across the channels of one tower.

  b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2) ** beta, the window
  centred on i and clipped at the first and last channel.
  """
  k: float = 2.0
  n: int = 5
  alpha: float = 1e-4
  beta: float = 0.75


@dataclasses.dataclass(frozen=True)
class SameMapNorm:
  """cuda-convnet's `rnorm`: normalise by a size x size window in the same map."""
  size: int = 5
  scale: float = 1e-3 / 25
  power: float = 0.75
  k: float = 1.0


def _power(base: jax.Array, exponent: float) -> jax.Array:
  """base ** exponent, with every variant's -0.75 as rsqrt(b) * sqrt(rsqrt(b)).

  XLA:CPU computes pow as an exp and a log, several times slower than the
  two square roots, which agree with pow to within a few units in the last
  place.
  """
  if exponent == -0.75:
    root = jax.lax.rsqrt(base)
    return root * jnp.sqrt(root)
  return base ** exponent


def local_response_norm(x: jax.Array, lrn: LRN) -> jax.Array:
  """LRN over the last (channel) axis of one tower's maps.

  The window sums are one matrix product with a banded 0/1 matrix, which
  clips the window at the edge channels by itself; forward and backward,
  that is several times faster on CPU than summing shifted slices.
  """
  channels = np.arange(x.shape[-1])
  band = np.abs(channels[:, None] - channels[None, :]) <= lrn.n // 2
  squares = jnp.square(x.astype(jnp.float32))
  window_sum = squares @ jnp.asarray(band, jnp.float32)
  scale = _power(lrn.k + lrn.alpha * window_sum, -lrn.beta)
  return (x * scale).astype(x.dtype)


def same_map_norm(x: jax.Array, norm: SameMapNorm) -> jax.Array:
  """cuda-convnet `rnorm`: a centred size x size window per map, zero-padded."""
  squares = jnp.square(x.astype(jnp.float32))
  window_sum = jax.lax.reduce_window(
      squares, 0.0, jax.lax.add, (1, norm.size, norm.size, 1), (1, 1, 1, 1),
      'SAME')
  scale = _power(norm.k + norm.scale * window_sum, -norm.power)
  return (x * scale).astype(x.dtype)


def _pool_windows(x: jax.Array) -> dict[tuple[int, int], jax.Array]:
  """The nine strided views of x that the 3x3, stride-2 windows take, by
  their offset (dy, dx) in the window."""
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return {(dy, dx): x[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2]
          for dy in range(3) for dx in range(3)}


@jax.custom_vjp
def max_pool(x: jax.Array) -> jax.Array:
  """The paper's overlapping pooling: 3x3 windows, stride 2, no padding.

  Forward, the maximum of nine strided views, faster on CPU than
  reduce_window with its select-and-scatter backward. Backward, as
  cuda-convnet's max-undo: every input equal to its window's maximum gets
  the window's gradient.
  """
  return functools.reduce(jnp.maximum, _pool_windows(x).values())


def _max_pool_forward(x):
  pooled = max_pool(x)
  return pooled, (x, pooled)


def _max_pool_backward(residuals, grad):
  """Each window's gradient goes to the inputs equal to its maximum.

  Along each axis an even input 2k is offset 0 of window k and offset 2 of
  window k - 1, an odd input 2k + 1 offset 1 of window k. So the four
  parity classes of the input are sums of shifted window gradients, which
  are then interleaved: a fraction of the work of autodiff of the forward,
  which makes a strided pad per view and selects that split ties.
  """
  x, pooled = residuals
  zero = jnp.zeros((), grad.dtype)
  shares = {offset: jnp.where(view == pooled, grad, zero)
            for offset, view in _pool_windows(x).items()}

  def on_grid(offset, shift_h, shift_w):
    # On a grid one larger than the pooled maps: shifted down/right by one
    # where the input's window is the previous one.
    return jnp.pad(shares[offset], ((0, 0), (shift_h, 1 - shift_h),
                                    (shift_w, 1 - shift_w), (0, 0)))

  even_even = (on_grid((0, 0), 0, 0) + on_grid((0, 2), 0, 1)
               + on_grid((2, 0), 1, 0) + on_grid((2, 2), 1, 1))
  even_odd = on_grid((0, 1), 0, 0) + on_grid((2, 1), 1, 0)
  odd_even = on_grid((1, 0), 0, 0) + on_grid((1, 2), 0, 1)
  odd_odd = on_grid((1, 1), 0, 0)
  n, grid_h, grid_w, c = even_even.shape
  interleave = lambda a, b, axis, shape: jnp.stack([a, b], axis).reshape(shape)
  even_rows = interleave(even_even, even_odd, 3, (n, grid_h, 2 * grid_w, c))
  odd_rows = interleave(odd_even, odd_odd, 3, (n, grid_h, 2 * grid_w, c))
  grad_x = interleave(even_rows, odd_rows, 2, (n, 2 * grid_h, 2 * grid_w, c))
  return (grad_x[:, :x.shape[1], :x.shape[2]],)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def conv1_padding(image_size: int, rule: str) -> tuple[tuple[int, int], ...]:
  """Padding for conv1 (11x11, stride 4).

  'ceil' is cuda-convnet's rule: 1 + ceil((size - 11) / 4) outputs, padded at
  the bottom and right, which turns 224 pixels into 55 outputs.
  """
  if rule == 'torch':
    return ((2, 2), (2, 2))
  outputs = 1 + math.ceil((image_size - 11) / 4)
  extra = (outputs - 1) * 4 + 11 - image_size
  return ((0, extra), (0, extra))
