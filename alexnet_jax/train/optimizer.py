"""SGD in the paper's form, and the learning-rate rules of the 2012 run.

The paper updates  v <- 0.9 v - 0.0005 e w - e g;  w <- w + v,  with the
learning rate e inside the momentum buffer. `optax.sgd(lr, momentum)` keeps
the raw gradients in the buffer and scales afterwards, which differs from the
paper as soon as e changes. `paper_sgd` builds the paper's order: decay,
scale by -e, then accumulate momentum.

The current learning rate is passed to every update (`learning_rate=`), so
the step-wise schedule and the divide-by-10-on-plateau rule (decided on the
host from validation error) share one optimizer.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _is_bias(path, _) -> bool:
  return getattr(path[-1], 'key', None) == 'bias'


def _bias_mask(params, biases: bool):
  """A tree of booleans, True at biases (biases=True) or at weights."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _is_bias(path, leaf) == biases, params)


def scale_by_current_learning_rate() -> optax.GradientTransformationExtraArgs:
  """Multiply updates by -learning_rate, given to `update` as an argument:
  one rate, or a tree of rates shaped like the parameters (`layer_rates`)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, learning_rate, **extra):
    del params, extra
    if jax.tree.structure(learning_rate) != jax.tree.structure(updates):
      learning_rate = jax.tree.map(lambda _: learning_rate, updates)
    return jax.tree.map(lambda u, e: -e * u, updates, learning_rate), state

  return optax.GradientTransformationExtraArgs(init, update)


def paper_sgd(momentum: float, weight_decay: float,
              bias_lr_multiplier: float = 1.0,
              bias_weight_decay: bool = False
              ) -> optax.GradientTransformationExtraArgs:
  """v <- momentum v - lr (wd w + g); w <- w + v (per-leaf options aside).

  bias_lr_multiplier, bias_weight_decay: the released 2012 code trained
  biases at twice the learning rate and without weight decay (the paper's
  update rule is written for weights only).
  """
  decay_mask = None if bias_weight_decay else (
      lambda params: _bias_mask(params, biases=False))
  parts = [optax.add_decayed_weights(weight_decay, mask=decay_mask)]
  if bias_lr_multiplier != 1.0:
    parts.append(optax.masked(optax.scale(bias_lr_multiplier),
                              lambda params: _bias_mask(params, biases=True)))
  parts += [scale_by_current_learning_rate(), optax.trace(decay=momentum)]
  return optax.chain(*parts)


class Plateau(NamedTuple):
  """The divide-on-plateau rule's memory, kept in the train state."""
  best_error: jax.Array          # best validation top-1 error so far
  evals_since_best: jax.Array    # evaluations without improvement
  reductions: jax.Array          # times the learning rate was divided

  @classmethod
  def initial(cls) -> 'Plateau':
    return cls(jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32),
               jnp.asarray(0, jnp.int32))


def update_plateau(plateau: Plateau, val_error: float, *, patience: int,
                   max_reductions: int, min_delta: float) -> Plateau:
  """Count an evaluation; divide once `patience` evaluations did not improve.

  The paper: "divide the learning rate by 10 when the validation error rate
  stopped improving with the current learning rate", three times in all.
  """
  # Compared in float32, the precision the best error is stored in.
  error = np.float32(val_error)
  if error < np.float32(plateau.best_error) - np.float32(min_delta):
    return Plateau(jnp.asarray(error),
                   jnp.asarray(0, jnp.int32), plateau.reductions)
  waited = int(plateau.evals_since_best) + 1
  reductions = int(plateau.reductions)
  if waited >= patience and reductions < max_reductions:
    return Plateau(plateau.best_error, jnp.asarray(0, jnp.int32),
                   jnp.asarray(reductions + 1, jnp.int32))
  return Plateau(plateau.best_error, jnp.asarray(waited, jnp.int32),
                 plateau.reductions)


def reached(epoch: float, step: jax.Array, steps_per_epoch: int) -> jax.Array:
  """Whether `step` is at or past `epoch` (never, for epoch -1)."""
  if epoch < 0:
    return jnp.asarray(False)
  return jnp.asarray(step) >= round(epoch * steps_per_epoch)


def _divisions_and_warmup(config, step, plateau: Plateau, steps_per_epoch):
  if config.lr_schedule == 'plateau':
    divisions = plateau.reductions.astype(jnp.float32)
  elif config.lr_schedule == 'piecewise':
    divisions = sum(reached(e, step, steps_per_epoch).astype(jnp.float32)
                    for e in config.lr_boundaries_epochs)
  else:
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}; use '
                     f'"plateau" or "piecewise"')
  # Optional linear warm-up (not in the paper, whose warmup_epochs is 0).
  warmup_steps = max(1, round(config.warmup_epochs * steps_per_epoch))
  return divisions, jnp.minimum(1.0, (step + 1) / warmup_steps)


def learning_rate(config, step: jax.Array, plateau: Plateau,
                  steps_per_epoch: int) -> jax.Array:
  """The learning rate at `step` under `config.lr_schedule`.

  'plateau': base rate times factor ** (divisions so far).
  'piecewise': base rate times factor after each of `lr_boundaries_epochs`.
  Both ramp up linearly over the first `warmup_epochs`.
  """
  divisions, warmup = _divisions_and_warmup(config, step, plateau,
                                            steps_per_epoch)
  return config.learning_rate * config.lr_factor ** divisions * warmup


def layer_rates(config, params, step: jax.Array, plateau: Plateau,
                steps_per_epoch: int):
  """Each parameter's learning rate: the schedule's, with the exceptions of
  the released run 145 where the config asks for them. Its biases kept their
  starting rate while the weights' fell (bias_lr_follows_schedule=False), and
  conv1's rate was divided once more at conv1_lr_cut_epoch and set to 0 at
  conv1_freeze_epoch."""
  scheduled = learning_rate(config, step, plateau, steps_per_epoch)
  _, warmup = _divisions_and_warmup(config, step, plateau, steps_per_epoch)
  conv1 = (jnp.where(reached(config.conv1_lr_cut_epoch, step,
                             steps_per_epoch), config.lr_factor, 1.0)
           * jnp.where(reached(config.conv1_freeze_epoch, step,
                               steps_per_epoch), 0.0, 1.0))

  def rate(path, leaf):
    e = scheduled
    if _is_bias(path, leaf) and not config.bias_lr_follows_schedule:
      e = config.learning_rate * warmup
    return e * conv1 if path[0].key == 'conv1' else e

  return jax.tree_util.tree_map_with_path(rate, params)
