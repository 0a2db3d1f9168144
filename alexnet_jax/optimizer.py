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
  """Multiply updates by -learning_rate, given to `update` as an argument."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, learning_rate, **extra):
    del params, extra
    return jax.tree.map(lambda u: -learning_rate * u, updates), state

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


def learning_rate(config, step: jax.Array, plateau: Plateau,
                  steps_per_epoch: int) -> jax.Array:
  """The learning rate at `step` under `config.lr_schedule`.

  'plateau': base rate times factor ** (divisions so far).
  'piecewise': base rate times factor after each of `lr_boundaries_epochs`.
  Both ramp up linearly over the first `warmup_epochs`.
  """
  factor = config.lr_factor
  if config.lr_schedule == 'plateau':
    divisions = plateau.reductions.astype(jnp.float32)
  elif config.lr_schedule == 'piecewise':
    boundaries = jnp.asarray([round(e * steps_per_epoch)
                              for e in config.lr_boundaries_epochs])
    divisions = jnp.sum(step >= boundaries).astype(jnp.float32)
  else:
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}; use '
                     f'"plateau" or "piecewise"')
  # Optional linear warm-up (not in the paper, whose warmup_epochs is 0).
  warmup_steps = max(1, round(config.warmup_epochs * steps_per_epoch))
  warmup = jnp.minimum(1.0, (step + 1) / warmup_steps)
  return config.learning_rate * factor ** divisions * warmup
