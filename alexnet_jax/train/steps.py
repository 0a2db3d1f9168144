"""Train state and the pure, compiled train and eval steps.

Nothing here imports TensorFlow: the GPU benchmark builds these steps on
machines that only have JAX, Flax, Optax and Orbax.

A batch is a dict of device arrays with the keys device_preprocessing.py
defines; the steps normalise it on the device.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from alexnet_jax.data import device_preprocessing
from alexnet_jax.model import alexnet
from alexnet_jax.model import parallel
from alexnet_jax.runtime import xla_cpu
from alexnet_jax.train import optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  plateau: optimizer.Plateau
  rng: jax.Array  # dropout keys are fold_in(rng, step)


def make_optimizer(config) -> optax.GradientTransformationExtraArgs:
  return optimizer.paper_sgd(
      momentum=config.momentum, weight_decay=config.weight_decay,
      bias_lr_multiplier=config.bias_lr_multiplier,
      bias_weight_decay=config.bias_weight_decay)


def create_train_state(config) -> TrainState:
  """The initial state on one device; a pure function of config.seed."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  params = alexnet.init_params(alexnet.build(config), init_rng, config.image_size)
  return TrainState(
      step=jnp.asarray(0, jnp.int32),
      params=params,
      opt_state=make_optimizer(config).init(params),
      plateau=optimizer.Plateau.initial(),
      rng=jax.random.key_data(dropout_rng),
  )


def mesh_towers(config, mesh: jax.sharding.Mesh) -> parallel.Towers:
  """How config's network is spread over `mesh` (towers or the 2014 hybrid)."""
  variant = alexnet.get_variant(config.model.variant)
  towers = parallel.mesh_towers(variant.towers, mesh,
                                config.mesh.fc_model_parallel)
  for units in alexnet.fc_units(config):
    towers.fc_units(units)  # a clear error now where the units do not split
  return towers


def _param_specs(tree, towers: parallel.Towers):
  return parallel.param_specs(tree, towers, alexnet.PER_TOWER_LAYERS,
                              alexnet.FC_LAYERS)


def state_shardings(config, mesh: jax.sharding.Mesh):
  """Parameters and their momenta split as `parallel.param_spec` says."""
  shapes = jax.eval_shape(lambda: create_train_state(config))
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      _param_specs(shapes, mesh_towers(config, mesh)))


def abstract_train_state(config, mesh: jax.sharding.Mesh):
  """Shapes, dtypes and shardings of the state on `mesh`, to restore into."""
  shapes = jax.eval_shape(lambda: create_train_state(config))
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes, state_shardings(config, mesh))


def create_sharded_train_state(config, mesh: jax.sharding.Mesh) -> TrainState:
  """The same initial state, made directly in place on `mesh`."""
  return xla_cpu.jit(lambda: create_train_state(config), runs_once=True,
                     out_shardings=state_shardings(config, mesh))()


def classification_sums(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 errors over the examples with weight 1.

  Sums (not means) so that batches, hosts and padded last batches combine
  exactly: divide by 'count' at the end.
  """
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # An example's rank: how many classes score strictly higher than its label.
  rank = jnp.sum(logits > label_logit, axis=-1)
  return {
      'loss': jnp.sum(loss * weights),
      'top1_error': jnp.sum((rank >= 1) * weights),
      'top5_error': jnp.sum((rank >= 5) * weights),
      'count': jnp.sum(weights),
  }


def means(sums: dict[str, Any]) -> dict[str, float]:
  count = float(sums['count'])
  return {k: float(v) / count for k, v in sums.items() if k != 'count'}


def _sharded(mesh, towers: parallel.Towers, per_device_sums: Callable, params,
             *other_specs) -> Callable:
  """`per_device_sums` run over the mesh; sums over the whole batch.

  Inside, each device holds its examples and its towers. Its sums are added
  over the batch's axes (`_total_over_batch`). With towers, the tower devices'
  copies are equal, since fc8 sees the gathered activations on every one;
  they come out one per tower device and are averaged, so gradients flow
  back through every tower's copy at 1/towers. (In the hybrid, the sum is
  over 'tower' as well, so the copies are equal there too.)
  """
  sharded = jax.shard_map(
      per_device_sums, mesh=mesh,
      in_specs=(_param_specs(params, towers),
                P(towers.batch_axes)) + other_specs,
      out_specs=P(parallel.TOWER))
  return lambda *args: jax.tree.map(jnp.mean, sharded(*args))


def _total_over_batch(sums, towers: parallel.Towers):
  """This device's sums added over the batch, with a leading copy axis."""
  return jax.tree.map(lambda s: jax.lax.psum(s, towers.batch_axes)[None], sums)


def mesh_model(config, mesh: jax.sharding.Mesh) -> alexnet.AlexNet:
  """The model as one device of `mesh` runs it inside `shard_map`."""
  return alexnet.build(config, mesh_towers(config, mesh))


def make_train_step(config, mesh: jax.sharding.Mesh,
                    steps_per_epoch: int) -> Callable:
  """A compiled `(state, batch) -> (state, metrics)` over `mesh`.

  The state is donated and keeps its shardings (`state_shardings`); the
  batch is split over its axes (`parallel.shard_batch`). Gradients come from
  differentiating the mesh-wide loss, so the transposes of the tower
  all-gathers and the sum over 'data' are derived, not written by hand.
  """
  tx = make_optimizer(config)
  model = mesh_model(config, mesh)
  mean = device_preprocessing.mean(config)
  rescale_std = (config.dataset.lighting_std
                 if config.dataset.lighting_rescale else None)

  def device_sums(params, batch, rng_data, lighting_on):
    images = device_preprocessing.normalize_for_training(
        batch[device_preprocessing.IMAGE], mean,
        batch[device_preprocessing.LIGHTING], lighting_on,
        batch[device_preprocessing.FLIP], rescale_std)
    logits = model.apply({'params': params}, images, train=True,
                         dropout_rng=jax.random.wrap_key_data(rng_data))
    return _total_over_batch(classification_sums(
        logits, batch[device_preprocessing.LABEL],
        jnp.ones_like(batch[device_preprocessing.LABEL], jnp.float32)),
                             model.towers)

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                     state.step)
    sums_fn = _sharded(mesh, model.towers, device_sums, state.params, P(),
                       P())
    lighting_on = ~optimizer.reached(config.dataset.lighting_off_epoch,
                                     state.step, steps_per_epoch)

    def loss_fn(params):
      sums = sums_fn(params, batch, jax.random.key_data(dropout_rng),
                     lighting_on)
      return sums['loss'] / sums['count'], sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params,
        learning_rate=optimizer.layer_rates(config, state.params, state.step,
                                            state.plateau, steps_per_epoch))
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {k: v / sums['count'] for k, v in sums.items() if k != 'count'}
    metrics['learning_rate'] = optimizer.learning_rate(
        config, state.step, state.plateau, steps_per_epoch)
    return new_state, metrics

  return xla_cpu.jit(train_step, donate_argnums=0,
                     out_shardings=(state_shardings(config, mesh), None))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
  """Whether every value in `tree` (parameters, say) is finite.

  Compiled once per tree structure, not at every check before a save.
  """
  return bool(_all_finite(tree))


def mean_log_probabilities(model: alexnet.AlexNet, members, images: jax.Array,
                           mean) -> jax.Array:
  """The log of the softmax averaged over ensemble members and crops, as in
  the paper.

  Computed as logsumexp of the log-softmaxes less log(n), so that a
  confident mistake whose probability underflows to 0 in float32 still has
  a finite loss. members: a sequence of parameter trees for `model`.
  images: uint8 (B, H, W, 3), or (B, crops, H, W, 3). Returns (B, classes).
  """
  crops = images.shape[1] if images.ndim == 5 else 1
  flat = device_preprocessing.normalize(
      images.reshape((-1,) + images.shape[-3:]), mean)
  log_probs = jnp.stack([jax.nn.log_softmax(model.apply({'params': params},
                                                        flat))
                         for params in members])        # (n, B * crops, C)
  log_probs = log_probs.reshape(len(members), images.shape[0], crops, -1)
  return (jax.nn.logsumexp(log_probs, axis=(0, 2))
          - jnp.log(len(members) * crops))


def mean_probabilities(model: alexnet.AlexNet, members, images: jax.Array,
                       mean) -> jax.Array:
  """The softmax averaged over ensemble members and crops (B, classes)."""
  return jnp.exp(mean_log_probabilities(model, members, images, mean))


def make_eval_step(config, mesh: jax.sharding.Mesh) -> Callable:
  """A compiled `(members, batch) -> sums` over `mesh`.

  members is a tuple of parameter trees: one network, or an ensemble whose
  softmax is averaged (`mean_probabilities`). batch['image'] is (B, H, W, 3)
  or, for multi-crop evaluation, (B, crops, H, W, 3). batch['mask'] is 0 for
  padding examples, which are not counted.
  """
  model = mesh_model(config, mesh)
  mean = device_preprocessing.mean(config)

  def device_sums(members, batch):
    log_probs = mean_log_probabilities(model, members,
                                       batch[device_preprocessing.IMAGE], mean)
    return _total_over_batch(classification_sums(
        log_probs, batch[device_preprocessing.LABEL],
        batch[device_preprocessing.MASK].astype(jnp.float32)),
                             model.towers)

  return xla_cpu.jit(lambda members, batch: _sharded(
      mesh, model.towers, device_sums, members)(members, batch))
