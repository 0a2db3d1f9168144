"""The optimizer follows the paper's update rule; the LR rules behave."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax.train import optimizer
import configs.paper_2012
import configs.released_2012


def _params():
  return {'conv1': {'kernel': jnp.asarray([0.5, -1.0, 2.0]),
                    'bias': jnp.asarray([1.0, 0.0])}}


def _grads(i):
  return {'conv1': {'kernel': jnp.asarray([0.1, 0.2, -0.3]) * (i + 1),
                    'bias': jnp.asarray([0.05, -0.4]) / (i + 1)}}


def _run(tx, lrs):
  params, state = _params(), None
  state = tx.init(params)
  for i, lr in enumerate(lrs):
    updates, state = tx.update(_grads(i), state, params, learning_rate=lr)
    params = optax.apply_updates(params, updates)
  return params


def _paper_rule(lrs, wd=5e-4, bias_lr=1.0, bias_decay=False):
  """v <- 0.9 v - wd e w - e g;  w <- w + v, written out in NumPy."""
  params = {k: np.asarray(v, np.float64) for k, v in _params()['conv1'].items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for i, e in enumerate(lrs):
    g = {k: np.asarray(x, np.float64) for k, x in _grads(i)['conv1'].items()}
    for k in params:
      e_k = e * (bias_lr if k == 'bias' else 1.0)
      wd_k = wd if (k != 'bias' or bias_decay) else 0.0
      v[k] = 0.9 * v[k] - wd_k * e_k * params[k] - e_k * g[k]
      params[k] = params[k] + v[k]
  return params


LRS = [0.01, 0.01, 0.001, 0.001, 0.0001]


@pytest.mark.parametrize('bias_decay', [False, True])
def test_update_equals_the_paper_rule_across_learning_rate_changes(bias_decay):
  got = _run(optimizer.paper_sgd(0.9, 5e-4, bias_weight_decay=bias_decay), LRS)
  want = _paper_rule(LRS, bias_decay=bias_decay)
  for k in want:
    np.testing.assert_allclose(got['conv1'][k], want[k], rtol=1e-6)


def test_optax_sgd_differs_once_the_learning_rate_changes():
  """Why paper_sgd exists: optax.sgd keeps the LR outside the buffer."""
  params = _params()
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.9)
  state = sgd.init(params)
  for i, lr in enumerate(LRS):
    state.hyperparams['learning_rate'] = lr
    g = optax.add_decayed_weights(5e-4).update(_grads(i), None, params)[0]
    updates, state = sgd.update(g, state, params)
    params = optax.apply_updates(params, updates)
  want = _paper_rule(LRS)
  assert not np.allclose(params['conv1']['kernel'], want['kernel'], rtol=1e-4)


def test_released_bias_rules_double_lr_and_skip_decay():
  tx = optimizer.paper_sgd(0.9, 5e-4, bias_lr_multiplier=2.0,
                           bias_weight_decay=False)
  got = _run(tx, LRS)
  want = _paper_rule(LRS, bias_lr=2.0, bias_decay=False)
  for k in want:
    np.testing.assert_allclose(got['conv1'][k], want[k], rtol=1e-6)
  # And it is not the same as the paper's rule.
  assert not np.allclose(want['bias'], _paper_rule(LRS)['bias'])


def _plateau_config():
  return dict(patience=2, max_reductions=3, min_delta=0.0)


def test_plateau_divides_after_patience_and_at_most_three_times():
  p = optimizer.Plateau.initial()
  errors = [0.9, 0.8, 0.8, 0.8,   # two evals without improvement: divide
            0.7, 0.75, 0.71,      # again
            0.9, 0.9,             # third division
            0.9, 0.9, 0.9, 0.9]   # no fourth
  reductions = []
  for e in errors:
    p = optimizer.update_plateau(p, e, **_plateau_config())
    reductions.append(int(p.reductions))
  assert reductions == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3]
  assert float(p.best_error) == pytest.approx(0.7)


def _lr_config(schedule):
  c = ml_collections.ConfigDict()
  c.learning_rate = 0.01
  c.lr_factor = 0.1
  c.lr_schedule = schedule
  c.lr_boundaries_epochs = (2, 4)
  c.warmup_epochs = 0.0
  return c


def test_learning_rate_schedules():
  p = optimizer.Plateau.initial()._replace(reductions=jnp.asarray(2))
  assert float(optimizer.learning_rate(_lr_config('plateau'), 0, p, 10)) == (
      pytest.approx(1e-4))
  piecewise = _lr_config('piecewise')
  got = [float(optimizer.learning_rate(piecewise, s, p, 10))
         for s in (0, 19, 20, 39, 40, 1000)]
  np.testing.assert_allclose(got, [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4],
                             rtol=1e-6)


def test_warmup_ramps_linearly_then_leaves_the_schedule_alone():
  c = _lr_config('piecewise')
  c.warmup_epochs = 1.0
  p = optimizer.Plateau.initial()
  got = [float(optimizer.learning_rate(c, s, p, 10)) for s in (0, 4, 9, 25)]
  np.testing.assert_allclose(got, [1e-3, 5e-3, 1e-2, 1e-3], rtol=1e-6)


def test_the_released_run_s_layer_rates_follow_its_schedule():
  """configs/released_2012.py against the table at the end of
  layer-params-145.cfg (epsW, epsB = 2 epsW at the start)."""
  c = configs.released_2012.get_config()
  params = {'conv1': {'kernel': 0., 'bias': 0.},
            'fc8': {'kernel': 0., 'bias': 0.}}
  p, spe = optimizer.Plateau.initial(), 10
  table = {  # epoch: (conv1 kernel, conv1 bias, fc8 kernel, fc8 bias)
      0: (1e-2, 1e-2, 1e-2, 1e-2),
      25: (1e-3, 1e-2, 1e-3, 1e-2),
      51: (1e-4, 1e-2, 1e-4, 1e-2),
      67: (1e-5, 1e-3, 1e-4, 1e-2),
      72: (0, 0, 1e-4, 1e-2),
      79: (0, 0, 1e-5, 1e-2),
      90: (0, 0, 1e-5, 1e-2)}
  for epoch, want in table.items():
    for step in (epoch * spe, epoch * spe + spe - 1):
      rates = optimizer.layer_rates(c, params, jnp.asarray(step), p, spe)
      got = [float(rates[layer][k]) for layer in ('conv1', 'fc8')
             for k in ('kernel', 'bias')]
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(step))
  # The bias multiplier (2x) is applied by paper_sgd on top of these.
  assert c.bias_lr_multiplier == 2.0
  # Every other config: one rate for every parameter.
  paper = configs.paper_2012.get_config()
  paper.lr_schedule = 'piecewise'
  rates = optimizer.layer_rates(paper, params, jnp.asarray(800), p, spe)
  np.testing.assert_allclose(jax.tree.leaves(rates), 1e-5, rtol=1e-6)
