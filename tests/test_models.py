"""The network's facts: shapes, parameter counts, LRN, initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.model import alexnet

from alexnet_jax.model import layers
from alexnet_jax.model import parallel
from alexnet_jax.runtime import xla_cpu


def _model(variant='paper_2012', **kwargs):
  v = alexnet.get_variant(variant)
  return alexnet.AlexNet(variant=v, towers=parallel.Towers(v.towers), **kwargs)


def _init(model, image_size):
  """alexnet.init_params compiled as one computation, as training runs it:
  op by op, each parameter's random draw compiled alone (20 s)."""
  return xla_cpu.jit(lambda: alexnet.init_params(model, jax.random.key(0),
                                                image_size), runs_once=True)()


def _lrn_numpy(a, k, n, alpha, beta):
  """The paper's formula, literally, in float64."""
  a = a.astype(np.float64)
  channels = a.shape[-1]
  b = np.empty_like(a)
  for i in range(channels):
    lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
    total = np.sum(a[..., lo:hi + 1] ** 2, axis=-1)
    b[..., i] = a[..., i] / (k + alpha * total) ** beta
  return b


@pytest.mark.parametrize('lrn', [layers.LRN(), layers.LRN(alpha=1e-4 / 5),
                                 layers.LRN(k=1.0, n=3, alpha=0.5, beta=0.5)])
def test_lrn_matches_the_formula_including_edge_channels(lrn):
  rng = np.random.default_rng(0)
  # Large values so that the normalisation is far from the identity.
  a = rng.normal(0, 60, (2, 3, 3, 7)).astype(np.float32)
  got = np.asarray(layers.local_response_norm(jnp.asarray(a), lrn))
  want = _lrn_numpy(a, lrn.k, lrn.n, lrn.alpha, lrn.beta)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert not np.allclose(got, a, rtol=1e-2)


def test_same_map_norm_matches_a_direct_sum():
  rng = np.random.default_rng(1)
  a = rng.normal(0, 30, (1, 6, 7, 2)).astype(np.float32)
  norm = layers.SameMapNorm()
  got = np.asarray(layers.same_map_norm(jnp.asarray(a), norm))
  a64 = a.astype(np.float64)
  want = np.empty_like(a64)
  for y in range(6):
    for x in range(7):
      window = a64[:, max(0, y - 2):y + 3, max(0, x - 2):x + 3]
      total = np.sum(window ** 2, axis=(1, 2))
      want[:, y, x] = a64[:, y, x] / (norm.k + norm.scale * total) ** norm.power
  np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize('variant,count', [
    ('paper_2012', 60_965_224), ('released_2012', 60_965_224),
    ('one_tower_2014', 61_100_840), ('torchvision', 61_100_840)])
def test_parameter_counts(variant, count):
  model = _model(variant)
  params = jax.eval_shape(
      lambda: alexnet.init_params(model, jax.random.key(0), 224))
  assert alexnet.count_params(params) == count


def test_every_layer_output_shape_at_224_pixels():
  model = _model()
  images = jnp.zeros((2, 224, 224, 3))
  params = jax.eval_shape(
      lambda: alexnet.init_params(model, jax.random.key(0), 224))

  def shapes(params):
    _, state = model.apply({'params': params}, images,
                           capture_intermediates=True)
    return state['intermediates']

  out = jax.eval_shape(shapes, params)
  per_tower = {
      'conv1': (2, 55, 55, 48), 'conv2': (2, 27, 27, 128),
      'conv3': (2, 13, 13, 192), 'conv4': (2, 13, 13, 192),
      'conv5': (2, 13, 13, 128), 'fc6': (2, 2048), 'fc7': (2, 2048)}
  for layer, shape in per_tower.items():
    towers = out[layer]['__call__'][0]
    assert [t.shape for t in towers] == [shape, shape], layer
  assert out['fc8']['__call__'][0].shape == (2, 1000)
  assert out['__call__'][0].shape == (2, 1000)


def test_pooling_and_padding_reach_the_paper_sizes():
  assert layers.conv1_padding(224, 'ceil') == ((0, 3), (0, 3))
  x = jnp.zeros((1, 55, 55, 1))
  assert layers.max_pool(x).shape == (1, 27, 27, 1)
  assert layers.max_pool(layers.max_pool(x)).shape == (1, 13, 13, 1)
  assert layers.max_pool(jnp.zeros((1, 13, 13, 1))).shape == (1, 6, 6, 1)


@pytest.mark.parametrize('size', [55, 56, 13])
def test_max_pool_gradient_matches_reduce_window_without_ties(size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  weights = jax.random.normal(jax.random.key(1), layers.max_pool(x).shape)
  reference = lambda x: jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'VALID')
  np.testing.assert_array_equal(layers.max_pool(x), reference(x))
  ours = jax.grad(lambda x: jnp.sum(layers.max_pool(x) * weights))(x)
  theirs = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_every_tied_maximum():
  """cuda-convnet's max-undo: each input equal to its window's maximum
  gets that window's whole gradient, so on a constant map an input gets the
  sum over the windows that hold it."""
  size, out = 7, 3
  weights = np.arange(1, out * out + 1, dtype=np.float32).reshape(out, out)
  expected = np.zeros((size, size), np.float32)
  for i in range(out):
    for j in range(out):
      expected[2 * i:2 * i + 3, 2 * j:2 * j + 3] += weights[i, j]
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x)[0, :, :, 0] * weights))(
      jnp.ones((1, size, size, 1)))
  np.testing.assert_array_equal(grad[0, :, :, 0], expected)


def test_small_images_and_widths_work():
  model = _model(width=0.25, num_classes=10)
  params = _init(model, 64)
  logits = jax.jit(model.apply)({'params': params}, jnp.ones((3, 64, 64, 3)))
  assert logits.shape == (3, 10)
  assert params['conv1']['kernel'].shape == (2, 11, 11, 3, 12)


def test_initial_statistics_per_layer():
  params = _init(_model(), 224)
  ones = {'conv2', 'conv4', 'conv5', 'fc6', 'fc7'}
  for layer in alexnet.LAYERS:
    w, b = np.asarray(params[layer]['kernel']), np.asarray(params[layer]['bias'])
    assert abs(w.mean()) < 1e-3, layer
    assert w.std() == pytest.approx(0.01, rel=0.05), layer
    np.testing.assert_array_equal(b, 1.0 if layer in ones else 0.0)


def test_positive_bias_config_sets_the_paper_bias_layers_only(tiny_config):
  tiny_config.model.positive_bias = 0.1
  params = _init(alexnet.build(tiny_config), tiny_config.image_size)
  for layer in alexnet.LAYERS:
    expected = 0.1 if layer in {'conv2', 'conv4', 'conv5', 'fc6', 'fc7'} else 0
    np.testing.assert_allclose(params[layer]['bias'], expected, err_msg=layer)


def test_released_variant_initialises_conv3_to_5_wider():
  params = _init(_model('released_2012'), 224)
  for layer, std in [('conv1', 0.01), ('conv3', 0.03), ('conv4', 0.03),
                     ('conv5', 0.03), ('fc6', 0.01)]:
    assert np.asarray(params[layer]['kernel']).std() == pytest.approx(
        std, rel=0.05), layer


def test_narrow_networks_keep_the_paper_activation_scale():
  """std grows by sqrt(paper fan-in / fan-in) when the net is narrowed."""
  params = _init(_model(width=0.25), 64)
  # conv2 sees 12 channels instead of 48: std 0.01 * sqrt(4).
  assert np.asarray(params['conv2']['kernel']).std() == pytest.approx(
      0.02, rel=0.05)
  # conv1 always sees the 3 colour channels: unchanged.
  assert np.asarray(params['conv1']['kernel']).std() == pytest.approx(
      0.01, rel=0.05)


def test_torchvision_variant_uses_pytorch_default_init():
  params = _init(_model('torchvision'), 224)
  w = np.asarray(params['conv2']['kernel'])
  bound = 1 / math.sqrt(5 * 5 * 64)
  assert w.min() >= -bound and w.max() <= bound
  assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert 'conv1' in params and params['conv1']['kernel'].shape == (
      1, 11, 11, 3, 64)


def test_dropout_only_in_training_and_differs_per_key():
  model = _model(width=0.25, num_classes=10)
  params = _init(model, 64)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3)) * 50
  apply = jax.jit(lambda rng=None: model.apply(
      {'params': params}, x, train=rng is not None, dropout_rng=rng))
  np.testing.assert_array_equal(apply(), apply())
  a = apply(jax.random.key(2))
  b = apply(jax.random.key(3))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, apply(jax.random.key(2)))


@pytest.mark.parametrize('variant, inverted', [
    ('paper_2012', False), ('released_2012', False),
    ('one_tower_2014', False), ('torchvision', True)])
def test_dropout_in_the_paper_form_or_pytorch_inverted_form(variant, inverted):
  """The paper (and the released code) zero units in training and halve all
  of them at test time; PyTorch's inverted form doubles the kept units in
  training. Either way the test-time output is the training output's mean."""
  model = _model(variant)
  x = jax.random.uniform(jax.random.key(0), (256, 512), minval=0.5,
                         maxval=2.0)
  drop = lambda rng: model.apply({}, x, rng, 0,
                                 method=alexnet.AlexNet._dropout)
  trained, tested = drop(jax.random.key(1)), drop(None)
  kept = trained != 0
  assert 0.45 < kept.mean() < 0.55
  np.testing.assert_allclose(trained[kept], (x * (2 if inverted else 1))[kept],
                             rtol=1e-6)
  np.testing.assert_allclose(tested, x * (1 if inverted else 0.5), rtol=1e-6)
  # The mean over examples of x * mask estimates the test-time output.
  np.testing.assert_allclose((trained / x).mean(), (tested / x).mean(),
                             rtol=0.02)


def test_with_no_dropout_training_and_test_outputs_agree():
  model = _model(width=0.25, num_classes=10, dropout_rate=0.0)
  params = _init(model, 64)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3)) * 50
  apply = jax.jit(lambda rng=None: model.apply(
      {'params': params}, x, train=rng is not None, dropout_rng=rng))
  # Two compilations: their fusions may round differently.
  np.testing.assert_allclose(apply(jax.random.key(2)), apply(), rtol=1e-5)


@pytest.mark.parametrize('grouped', [False, True])
def test_conv3_and_fc_layers_see_both_towers(grouped):
  """Zeroing tower 1's conv2 changes tower 0's conv3 but not its conv4 input."""
  model = _model(width=0.25, num_classes=10, grouped_convolutions=grouped)
  params = _init(model, 64)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 50

  @jax.jit
  def intermediates(params):
    _, state = model.apply({'params': params}, x, capture_intermediates=True)
    return state['intermediates']

  towers_of = lambda params, layer: intermediates(params)[layer]['__call__'][0]

  cut = jax.tree.map(lambda p: p, params)
  cut['conv2'] = {k: v.at[1].set(0.0) for k, v in params['conv2'].items()}
  # conv2 is within-tower: tower 0's conv2 output is unchanged.
  np.testing.assert_array_equal(towers_of(params, 'conv2')[0],
                                towers_of(cut, 'conv2')[0])
  # conv3 is cross-tower: tower 0's conv3 output changes.
  assert not np.allclose(towers_of(params, 'conv3')[0],
                         towers_of(cut, 'conv3')[0])


def test_grouped_convolutions_compute_the_same_network():
  """One feature_group_count=2 convolution per layer, or one per tower."""
  separate = _model(width=0.25, num_classes=10)
  grouped = _model(width=0.25, num_classes=10, grouped_convolutions=True)
  params = _init(separate, 64)
  x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3)) * 50

  def loss_and_grads(model):
    loss = lambda p: jnp.sum(jax.nn.log_softmax(model.apply(
        {'params': p}, x, train=True, dropout_rng=jax.random.key(2)))[:, 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss, grads), (grouped_loss, grouped_grads) = map(
      loss_and_grads, (separate, grouped))
  np.testing.assert_allclose(grouped_loss, loss, rtol=1e-5)
  for layer in ('conv2', 'conv4', 'conv5', 'fc8'):
    np.testing.assert_allclose(grouped_grads[layer]['kernel'],
                               grads[layer]['kernel'], rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(
                                   grads[layer]['kernel']))))


def test_unknown_variant_is_rejected_with_the_choices():
  with pytest.raises(Exception, match='unknown model.variant .*paper_2012'):
    alexnet.get_variant('alexnet_v3')
