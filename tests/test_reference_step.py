"""One train step against a second, independent writing of the network.

The reference below uses jax.lax and jax.numpy only, none of the project's
model, layer, normalisation, optimizer or step code: it is the paper's
description written out (two towers, ReLU, LRN, overlapping pooling, conv3
and the fully connected layers seeing both towers), and its gradients come
from differentiating it. It reads the project's initial parameters, which
hold each per-tower layer's weights with a leading tower axis.

Dropout is set to 0 here, so both sides use the same (all-ones) mask; its
two forms are tested in test_models.py.

Tolerance: both sides compute in float32 and differ only in the order of
their sums, a relative error of a few float32 epsilons (1.2e-7) per sum over
at most ~6,000 terms (fc6's fan-in at this width): at worst ~1e-5 of the
loss. The updates are -lr (wd w + g): held to 1e-4 of each layer's update
norm, with room for the gradient of a sum of terms that cancel.
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import parallel
from alexnet_jax import steps


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
  """paper_2012 (two towers, LRN) or torchvision (one tower, no LRN)."""
  relu = jax.nn.relu
  towers = p['conv1']['kernel'].shape[0] if variant == 'paper_2012' else 1
  lrn = _lrn if variant == 'paper_2012' else (lambda a: a)
  layer = lambda name, t: (p[name]['kernel'][t], p[name]['bias'][t])
  h = []
  for t in range(towers):
    a = _pool(lrn(relu(_conv(x, *layer('conv1', t), 4,
                             _conv1_padding(x.shape[1], variant)))))
    h.append(_pool(lrn(relu(_conv(a, *layer('conv2', t), 1, ((2, 2),) * 2)))))
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


def reference_step(params, batch, mean_rgb, variant, lr, momentum, wd):
  """Loss and parameters after one step of the paper's SGD from zero
  momentum: v = momentum * 0 - wd lr w - lr g (no decay for biases)."""
  del momentum  # the buffer starts at zero
  x = (batch['image'].astype(jnp.float32) - jnp.asarray(mean_rgb)
       + batch['lighting'][:, None, None, :])

  def loss_fn(p):
    logits = reference_logits(p, x, variant)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, batch['label'][:, None], 1))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  new = jax.tree_util.tree_map_with_path(
      lambda path, w, g: w - lr * g - (
          0 if path[-1].key == 'bias' else lr * wd * w), params, grads)
  return loss, new


@pytest.mark.parametrize('variant', ['paper_2012', 'torchvision'])
def test_one_train_step_equals_the_independent_reference(tiny_config,
                                                         variant):
  config = tiny_config
  config.model.variant = variant
  config.model.dropout_rate = 0.0
  config.bias_weight_decay = False
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
      'label': rng.integers(0, 10, 16).astype(np.int32),
      'lighting': rng.normal(0, 20, (16, 3)).astype(np.float32)}
  mesh = parallel.make_mesh(config)
  state = steps.create_sharded_train_state(config, mesh)
  params = jax.device_get(state.params)
  step = steps.make_train_step(config, mesh, steps_per_epoch=100)
  state, metrics = step(state, parallel.shard_batch(
      batch, mesh, steps.mesh_towers(config, mesh)))

  loss, want = reference_step(params, batch, config.dataset.mean_rgb,
                              variant, config.learning_rate, config.momentum,
                              config.weight_decay)
  assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-5)
  got = jax.device_get(state.params)
  for (path, new), old, ref in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params),
      jax.tree.leaves(got)):
    update, ref_update = ref - old, new - old
    error = np.linalg.norm(update - ref_update) / np.linalg.norm(ref_update)
    assert error < 1e-4, (jax.tree_util.keystr(path), error)
