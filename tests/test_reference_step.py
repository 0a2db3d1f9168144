"""One train step against a second, independent writing of the network.

The reference below uses jax.lax and jax.numpy only, none of the project's
model, layer, normalisation, optimizer or step code: it is the paper's
description written out (two towers, ReLU, LRN, overlapping pooling, conv3
and the fully connected layers seeing both towers), and its gradients come
from differentiating it. released_2012 is the same network as the released
cuda-convnet files describe it (facts in ../shared/RELEASED_2012_FACTS.md):
conv1's LRN before pooling and ReLU, LRN's alpha divided by n, a 5x5
same-map norm after conv2's LRN, biases at twice the rate, and the lit crop
divided by 1 + lighting_std. It reads the project's initial parameters, which
hold each per-tower layer's weights with a leading tower axis.

Dropout is set to 0 here, so both sides use the same (all-ones) mask; its
two forms are tested in test_models.py.

Tolerance: both sides compute in float32 and differ only in the order of
their sums, a relative error of a few float32 epsilons (1.2e-7) per sum over
at most ~6,000 terms (fc6's fan-in at this width): at worst ~1e-5 of the
loss. The updates are -lr (wd w + g), held to 1e-4 of each layer's update
norm, with room for the gradient of a sum of terms that cancel, plus the
rounding of the new parameters to float32 on both sides: one unit in the
last place of each (np.spacing), which at small rates is of the order of
the update's own differences.
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.model import parallel
from alexnet_jax.train import steps


def _conv(x, kernel, bias, stride, padding):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


def _lrn(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
  """b_i = a_i / (k + alpha sum_{j=i-n/2}^{i+n/2} a_j^2)^beta, clipped at the
  first and last channel."""
  squares = jnp.pad(a * a, ((0, 0),) * 3 + ((n // 2, n // 2),))
  total = sum(squares[..., j:j + a.shape[-1]] for j in range(n))
  return a / (k + alpha * total) ** beta


def _released_lrn(a):
  """cuda-convnet's rnorm layer: its scale 1e-4 divided by the size, 5."""
  return _lrn(a, alpha=1e-4 / 5)


def _same_map_norm(a, size=5, scale=1e-3, power=0.75):
  """cuda-convnet's cnorm layer: a centred size x size window of squares in
  the same map, zero beyond the edge, its scale divided by size^2, min 1."""
  r = size // 2
  squares = jnp.pad(a * a, ((0, 0), (r, r), (r, r), (0, 0)))
  h, w = a.shape[1:3]
  total = sum(squares[:, dy:dy + h, dx:dx + w]
              for dy in range(size) for dx in range(size))
  return a / (1.0 + scale / size**2 * total) ** power


def _pool(a):
  """3x3 windows, stride 2, no padding."""
  return lax.reduce_window(a, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                           'VALID')


def _conv1_padding(size, variant):
  if variant == 'torchvision':
    return ((2, 2), (2, 2))
  # cuda-convnet: 1 + ceil((size - 11) / 4) outputs, padded bottom and right.
  outputs = -(-(size - 11) // 4) + 1
  extra = (outputs - 1) * 4 + 11 - size
  return ((0, extra), (0, extra))


def reference_logits(p, x, variant):
  """paper_2012 (two towers, LRN), released_2012 (two towers, its norms) or
  torchvision (one tower, no LRN)."""
  relu = jax.nn.relu
  towers = 1 if variant == 'torchvision' else p['conv1']['kernel'].shape[0]
  layer = lambda name, t: (p[name]['kernel'][t], p[name]['bias'][t])
  h = []
  for t in range(towers):
    a = _conv(x, *layer('conv1', t), 4, _conv1_padding(x.shape[1], variant))
    if variant == 'released_2012':
      a = relu(_pool(_released_lrn(a)))
      a = relu(_conv(a, *layer('conv2', t), 1, ((2, 2),) * 2))
      h.append(_pool(_same_map_norm(_released_lrn(a))))
    else:
      lrn = _lrn if variant == 'paper_2012' else (lambda a: a)
      a = _pool(lrn(relu(a)))
      h.append(_pool(lrn(relu(_conv(a, *layer('conv2', t), 1,
                                    ((2, 2),) * 2)))))
  both = jnp.concatenate(h, axis=-1)
  h = [relu(_conv(both, *layer('conv3', t), 1, ((1, 1),) * 2))
       for t in range(towers)]
  h = [relu(_conv(a, *layer('conv4', t), 1, ((1, 1),) * 2))
       for t, a in enumerate(h)]
  h = [_pool(relu(_conv(a, *layer('conv5', t), 1, ((1, 1),) * 2)))
       for t, a in enumerate(h)]
  f = jnp.concatenate(h, axis=-1).reshape(x.shape[0], -1)
  for name in ('fc6', 'fc7'):
    f = jnp.concatenate([relu(f @ w + b) for w, b in (
        layer(name, t) for t in range(towers))], axis=-1)
  return f @ p['fc8']['kernel'] + p['fc8']['bias']


def reference_step(params, batch, mean_rgb, variant, lr, wd, lighting_std):
  """Loss and parameters after one step of the paper's SGD from zero
  momentum: v = momentum * 0 - wd lr w - lr g (no decay for biases, and in
  released_2012 twice the rate for them)."""
  images = jnp.where(batch['flip'][:, None, None, None],
                     jnp.flip(batch['image'], axis=2), batch['image'])
  x = (images.astype(jnp.float32) - jnp.asarray(mean_rgb)
       + batch['lighting'][:, None, None, :])
  bias_lr = lr
  if variant == 'released_2012':
    x = x / (1.0 + lighting_std)
    bias_lr = 2 * lr

  def loss_fn(p):
    logits = reference_logits(p, x, variant)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, batch['label'][:, None], 1))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  new = jax.tree_util.tree_map_with_path(
      lambda path, w, g: w - bias_lr * g if path[-1].key == 'bias'
      else w - lr * g - lr * wd * w, params, grads)
  return loss, new


@pytest.mark.parametrize('variant',
                         ['paper_2012', 'released_2012', 'torchvision'])
def test_one_train_step_equals_the_independent_reference(tiny_config,
                                                         variant):
  config = tiny_config
  config.model.variant = variant
  config.model.dropout_rate = 0.0
  config.bias_weight_decay = False
  if variant == 'released_2012':  # as configs/released_2012.py sets them
    config.bias_lr_multiplier = 2.0
    config.dataset.lighting_rescale = True
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
      'label': rng.integers(0, 10, 16).astype(np.int32),
      'lighting': rng.normal(0, 20, (16, 3)).astype(np.float32),
      'flip': rng.integers(0, 2, 16).astype(bool)}
  mesh = parallel.make_mesh(config)
  state = steps.create_sharded_train_state(config, mesh)
  params = jax.device_get(state.params)
  step = steps.make_train_step(config, mesh, steps_per_epoch=100)
  state, metrics = step(state, parallel.shard_batch(
      batch, mesh, steps.mesh_towers(config, mesh)))

  # Jitted: op by op, the reference took about 30 s a variant.
  loss, want = jax.jit(reference_step, static_argnums=3)(
      params, batch, config.dataset.mean_rgb, variant, config.learning_rate,
      config.weight_decay, config.dataset.lighting_std)
  assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-5)
  got = jax.device_get(state.params)
  for (path, reference), before, project in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params),
      jax.tree.leaves(got)):
    reference_update = reference - before
    rounding = np.linalg.norm(np.spacing(np.abs(reference)))
    error = np.linalg.norm(project - reference)
    assert error <= rounding + 1e-4 * np.linalg.norm(reference_update), (
        jax.tree_util.keystr(path), error, rounding,
        np.linalg.norm(reference_update))
