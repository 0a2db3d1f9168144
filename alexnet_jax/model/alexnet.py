"""The AlexNet family as Flax modules, laid out like Figure 2 of the 2012 paper.

Every per-tower layer stores its parameters with a leading tower axis, so one
parameter tree serves one device (both towers held locally) and a mesh whose
'tower' axis gives each device its own tower. The layers never talk across
towers themselves: they call `parallel.Towers.gather`, the one place where
cross-tower communication is written.
"""

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.model import layers
from alexnet_jax.model import parallel
from alexnet_jax.runtime import errors


@dataclasses.dataclass(frozen=True)
class Variant:
  """Everything that distinguishes one member of the family from another."""
  towers: int                       # 2: the 2012 two-GPU split; 1: one tower
  conv_features: tuple[int, ...]    # conv1..conv5 output channels, per tower
  fc_features: int                  # fc6 and fc7 outputs, per tower
  conv1_padding: str                # 'ceil': cuda-convnet's rule; 'torch': pad 2
  lrn: Optional[layers.LRN]         # after conv1 and conv2; None: no LRN
  lrn_before_relu_conv1: bool       # released code: conv1 -> LRN -> pool -> ReLU
  conv2_same_map_norm: Optional[layers.SameMapNorm]
  dropout_on_fc_inputs: bool        # torchvision: dropout before fc6/fc7
  inverted_dropout: bool            # PyTorch's form; see AlexNet._dropout
  init: str                         # 'gaussian' or 'torch' (PyTorch defaults)
  weight_std: tuple[float, ...]     # conv1..conv5, fc6, fc7, fc8 (gaussian)
  positive_bias_layers: frozenset[str]  # layers whose biases start positive
  positive_bias: float = 1.0        # their initial bias (paper: 1)


_PAPER_STD = (0.01,) * 8
_PAPER_POSITIVE_BIAS = frozenset({'conv2', 'conv4', 'conv5', 'fc6', 'fc7'})

VARIANTS = {
    'paper_2012': Variant(
        towers=2, conv_features=(48, 128, 192, 192, 128), fc_features=2048,
        conv1_padding='ceil', lrn=layers.LRN(), lrn_before_relu_conv1=False,
        conv2_same_map_norm=None, dropout_on_fc_inputs=False,
        inverted_dropout=False, init='gaussian', weight_std=_PAPER_STD,
        positive_bias_layers=_PAPER_POSITIVE_BIAS),
    'released_2012': Variant(
        towers=2, conv_features=(48, 128, 192, 192, 128), fc_features=2048,
        conv1_padding='ceil', lrn=layers.LRN(alpha=1e-4 / 5),
        lrn_before_relu_conv1=True, conv2_same_map_norm=layers.SameMapNorm(),
        dropout_on_fc_inputs=False, inverted_dropout=False, init='gaussian',
        weight_std=(0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01),
        positive_bias_layers=_PAPER_POSITIVE_BIAS),
    'one_tower_2014': Variant(
        towers=1, conv_features=(64, 192, 384, 256, 256), fc_features=4096,
        conv1_padding='ceil', lrn=layers.LRN(), lrn_before_relu_conv1=False,
        conv2_same_map_norm=None, dropout_on_fc_inputs=False,
        inverted_dropout=False, init='gaussian', weight_std=_PAPER_STD,
        positive_bias_layers=_PAPER_POSITIVE_BIAS),
    'torchvision': Variant(
        towers=1, conv_features=(64, 192, 384, 256, 256), fc_features=4096,
        conv1_padding='torch', lrn=None, lrn_before_relu_conv1=False,
        conv2_same_map_norm=None, dropout_on_fc_inputs=True,
        inverted_dropout=True, init='torch', weight_std=_PAPER_STD,
        positive_bias_layers=frozenset()),
}


def get_variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise errors.UserError(f'unknown model.variant {name!r}; choose one of '
                           f'{", ".join(sorted(VARIANTS))}')
  return VARIANTS[name]


def paper_fan_in(variant: Variant, layer: str) -> int:
  """A layer's fan-in in the full-width network on 224-pixel images."""
  c = variant.conv_features
  all_towers = variant.towers
  return {
      'conv1': 11 * 11 * 3,
      'conv2': 5 * 5 * c[0],
      'conv3': 3 * 3 * c[1] * all_towers,
      'conv4': 3 * 3 * c[2],
      'conv5': 3 * 3 * c[3],
      'fc6': 6 * 6 * c[4] * all_towers,
      'fc7': variant.fc_features * all_towers,
      'fc8': variant.fc_features * all_towers,
  }[layer]


def _initializers(variant: Variant, layer: str, fan_in: int):
  """Weight and bias initialisers for one layer.

  Gaussian weights keep the paper's std at full width and 224 pixels; a
  narrower network or smaller images shrink fan-ins, so the std grows by
  sqrt(paper fan-in / fan-in) and every layer starts at the paper's
  activation scale (without this, a quarter-width net never starts learning).
  """
  if variant.init == 'torch':
    # PyTorch's defaults: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    return uniform, uniform
  std = (variant.weight_std[LAYERS.index(layer)]
         * math.sqrt(paper_fan_in(variant, layer) / fan_in))
  weight = nn.initializers.normal(stddev=std)
  bias = (nn.initializers.constant(variant.positive_bias)
          if layer in variant.positive_bias_layers else nn.initializers.zeros)
  return weight, bias


LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')
# Layers whose parameters carry a leading tower axis; fc8 is one whole layer.
PER_TOWER_LAYERS = frozenset(LAYERS) - {'fc8'}
# Layers whose output units the 2014 hybrid splits over devices.
FC_LAYERS = frozenset({'fc6', 'fc7', 'fc8'})


def scaled(features: int, width: float) -> int:
  """A layer's width in a network `width` times as wide as the paper's."""
  return max(1, round(features * width))


def fc_units(config) -> tuple[int, int, int]:
  """The output units of fc6, fc7 and fc8 (per tower) of config's network."""
  fc = scaled(get_variant(config.model.variant).fc_features,
              config.model.width)
  return fc, fc, config.model.num_classes


class TowerConv(nn.Module):
  """A convolution split into towers: kernel (towers, kh, kw, in, out).

  grouped: where a device holds several towers with their own inputs (conv2,
  conv4, conv5 with mesh.tower=1), one convolution with
  feature_group_count=towers instead of one per tower. Same result; which is
  faster depends on the backend (`model.grouped_convolutions`).
  """
  variant: Variant
  towers: parallel.Towers
  features: int
  kernel_size: int
  stride: int
  padding: tuple[tuple[int, int], ...]
  dtype: jnp.dtype
  grouped: bool = False

  @nn.compact
  def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
    k, cin = self.kernel_size, xs[0].shape[-1]
    w_init, b_init = _initializers(self.variant, self.name, k * k * cin)
    kernel = self.param('kernel', w_init,
                        (self.towers.local, k, k, cin, self.features))
    bias = self.param('bias', b_init, (self.towers.local, self.features))
    conv = lambda x, w, groups=1: jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride),
        self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)
    towers = len(xs)
    if towers == 1:
      return [conv(xs[0], kernel[0]) + bias[0].astype(self.dtype)]
    side_by_side = jnp.moveaxis(kernel, 0, -2).reshape(
        k, k, cin, towers * self.features)
    all_biases = bias.reshape(-1).astype(self.dtype)
    if all(x is xs[0] for x in xs):
      # conv1 and conv3: every local tower reads the same input, so one
      # convolution with the kernels side by side does them all, faster on
      # CPU than one per tower.
      y = conv(xs[0], side_by_side) + all_biases
    elif self.grouped:
      y = conv(jnp.concatenate(xs, axis=-1), side_by_side, towers) + all_biases
    else:
      return [conv(x, kernel[t]) + bias[t].astype(self.dtype)
              for t, x in enumerate(xs)]
    return jnp.split(y, towers, axis=-1)


class TowerDense(nn.Module):
  """A fully connected layer split into towers: kernel (towers, in, out).

  In the 2014 hybrid a device holds only its share of the output units
  (`Towers.fc_units`) and returns every device's (`Towers.fc_outputs`).
  """
  variant: Variant
  towers: parallel.Towers
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
    fan_in = xs[0].shape[-1]
    w_init, b_init = _initializers(self.variant, self.name, fan_in)
    units = self.towers.fc_units(self.features)
    kernel = self.param('kernel', w_init, (self.towers.local, fan_in, units))
    bias = self.param('bias', b_init, (self.towers.local, units))
    return [self.towers.fc_outputs(x.astype(self.dtype)
                                   @ kernel[t].astype(self.dtype)
                                   + bias[t].astype(self.dtype))
            for t, x in enumerate(xs)]


class AlexNet(nn.Module):
  """AlexNet: five convolutional and three fully connected layers.

  `width` scales every layer's width (for small runs); any image size of at
  least 64 pixels works. Call with `train=True` and a `dropout_rng` to train.
  """
  variant: Variant
  num_classes: int = 1000
  width: float = 1.0
  towers: parallel.Towers = parallel.Towers()
  dropout_rate: float = 0.5
  dtype: jnp.dtype = jnp.float32
  grouped_convolutions: bool = False   # see TowerConv

  def _dropout(self, x: jax.Array, rng: Optional[jax.Array],
               local_tower: int):
    """Dropout whose mask depends on the example and tower, not the mesh.

    The paper's form (and the released code's) keeps units unscaled in
    training and multiplies every unit by the keep probability at test time
    (rng None). PyTorch's inverted form divides the kept units by the keep
    probability in training and leaves test time alone: the same test-time
    function, but the next layer trains on inputs twice as large.

    Each example's mask comes from a key folded with its index in the global
    batch and the tower's global index, so a run on any mesh drops the same
    units as a run on one device.
    """
    keep_probability = 1.0 - self.dropout_rate
    if rng is None:
      return x if self.variant.inverted_dropout else (
          x * keep_probability).astype(x.dtype)
    rng = jax.random.fold_in(rng, self.towers.global_index(local_tower))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
        rng, self.towers.example_ids(x.shape[0]))
    keep = jax.vmap(lambda k: jax.random.bernoulli(
        k, keep_probability, x.shape[1:]))(keys)
    kept = x / keep_probability if self.variant.inverted_dropout else x
    return jnp.where(keep, kept, 0).astype(x.dtype)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    v, towers = self.variant, self.towers
    if images.shape[1] < 64 or images.shape[2] < 64:
      raise errors.UserError(f'AlexNet needs images of at least 64x64 pixels, '
                             f'got {images.shape[1]}x{images.shape[2]}')
    c1, c2, c3, c4, c5 = (scaled(f, self.width) for f in v.conv_features)
    conv = lambda name, f, k, s, pad: TowerConv(
        v, towers, f, k, s, pad, self.dtype, self.grouped_convolutions,
        name=name)
    relu = lambda xs: [nn.relu(x) for x in xs]
    pool = lambda xs: [layers.max_pool(x) for x in xs]
    lrn = lambda xs: [layers.local_response_norm(x, v.lrn) for x in xs]

    # Layer 1, each tower on the whole image.
    xs = conv('conv1', c1, 11, 4, layers.conv1_padding(images.shape[1],
                                                 v.conv1_padding))(
                                                     [images] * towers.local)
    if v.lrn_before_relu_conv1:
      xs = relu(pool(lrn(xs)))
    else:
      xs = relu(xs)
      xs = pool(lrn(xs) if v.lrn else xs)
    # Layer 2: each tower sees only its own layer-1 maps.
    xs = relu(conv('conv2', c2, 5, 1, ((2, 2), (2, 2)))(xs))
    if v.lrn:
      xs = lrn(xs)
    if v.conv2_same_map_norm:
      xs = [layers.same_map_norm(x, v.conv2_same_map_norm) for x in xs]
    xs = pool(xs)
    # Layer 3 takes the maps of both towers.
    everything = towers.gather(xs)
    xs = relu(conv('conv3', c3, 3, 1, ((1, 1), (1, 1)))(
        [everything] * towers.local))
    # Layers 4 and 5 stay within their tower.
    xs = relu(conv('conv4', c4, 3, 1, ((1, 1), (1, 1)))(xs))
    xs = pool(relu(conv('conv5', c5, 3, 1, ((1, 1), (1, 1)))(xs)))

    # Fully connected layers: each sees the outputs of both towers (and in
    # the 2014 hybrid, every example of the device group).
    features = towers.fc_inputs(towers.gather(xs))
    x = features.reshape(features.shape[0], -1)
    f = scaled(v.fc_features, self.width)
    dropout = lambda xs, layer: [
        self._dropout(x, jax.random.fold_in(dropout_rng, LAYERS.index(layer))
                      if train else None, t) for t, x in enumerate(xs)]
    for layer in ('fc6', 'fc7'):
      xs = [x] * towers.local
      if v.dropout_on_fc_inputs:
        xs = dropout(xs, layer)
      xs = relu(TowerDense(v, towers, f, self.dtype, name=layer)(xs))
      if not v.dropout_on_fc_inputs:
        xs = dropout(xs, layer)
      x = towers.gather(xs)

    w_init, b_init = _initializers(v, 'fc8', x.shape[-1])
    logits = nn.Dense(towers.fc_units(self.num_classes), dtype=self.dtype,
                      kernel_init=w_init, bias_init=b_init, name='fc8')(x)
    logits = towers.own_examples(towers.fc_outputs(logits))
    return logits.astype(jnp.float32)


def build(config, towers: Optional[parallel.Towers] = None) -> AlexNet:
  """The model named by `config.model`, with towers held as `towers` says."""
  variant = dataclasses.replace(get_variant(config.model.variant),
                                positive_bias=config.model.positive_bias)
  return AlexNet(
      variant=variant,
      num_classes=config.model.num_classes,
      width=config.model.width,
      towers=towers or parallel.Towers(count=variant.towers),
      dropout_rate=config.model.dropout_rate,
      dtype=jnp.dtype(config.dtype),
      grouped_convolutions=config.model.grouped_convolutions,
  )


def init_params(model: AlexNet, rng: jax.Array, image_size: int):
  """Random initial parameters (a pure function of the seed)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(rng, images)['params']


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
