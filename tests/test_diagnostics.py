"""Gradient-alignment diagnostics against numpy, in the trainer's metrics and in the report's plot."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import diagnostics
from ghl_jax.train import steps


def _np_cos(a, b):
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return a.dot(b) / (np.linalg.norm(a) * np.linalg.norm(b))


def _np_top_overlap(g, h, fraction=0.1):
  g, h = np.abs(np.ravel(g)), np.abs(np.ravel(h))
  k = max(1, int(round(fraction * g.size)))
  return len(set(np.argsort(-g)[:k]) & set(np.argsort(-h)[:k])) / k


def test_alignment_matches_numpy():
  g = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  h = jax.random.normal(jax.random.key(1), (3, 3, 4, 8)) * jnp.linspace(0.0, 1.0, 8)   # some near-zero
  update = -0.1 * (jnp.sign(g) * jnp.abs(h / jnp.abs(h).max()) + 0.05 * jax.random.normal(jax.random.key(2), g.shape))
  hebb = {'conv/kernel': ghl_jax.Hebbian(h)}
  got = diagnostics.alignment(hebb, {'conv': {'kernel': g}}, {'conv': {'kernel': update}})['conv']
  h_hat = np.asarray(h) / np.abs(np.asarray(h)).max()
  np.testing.assert_allclose(got['cos_update'], _np_cos(-np.asarray(update), g), rtol=1e-5)
  np.testing.assert_allclose(got['cos_magnitude'], _np_cos(np.abs(h_hat), np.abs(g)), rtol=1e-5)
  np.testing.assert_allclose(got['cos_magnitude'], _np_cos(np.sign(g) * np.abs(h_hat), g), rtol=1e-5)
  np.testing.assert_allclose(got['near_zero'], np.mean(np.abs(h_hat) < 1e-3), rtol=1e-6)
  np.testing.assert_allclose(got['top_overlap'], _np_top_overlap(g, h_hat), rtol=1e-6)
  np.testing.assert_allclose(got['sign_agreement'], np.mean(np.sign(-np.asarray(h)) == np.sign(g)), rtol=1e-6)
  assert 0.0 < float(got['near_zero']) < 1.0 and 0.0 < float(got['top_overlap']) <= 1.0


def test_stacked_terms_are_normalised_per_block():
  h = jnp.stack([jnp.ones((2, 3)), 100 * jnp.ones((2, 3))])
  got = diagnostics.alignment({'s/kernel': ghl_jax.Hebbian(h, stacked=1)}, {'s': {'kernel': jnp.ones((2, 2, 3))}})
  np.testing.assert_allclose(got['s']['cos_magnitude'], 1.0, rtol=1e-6)        # both blocks |Ĥ| = 1
  assert 'cos_update' not in got['s']


def deephebb_step_inputs(use_ghl: bool):
  """A tiny DeepHebb, a batch of 4, its variables, a Rule, the paper's optimizer (GHL or BP groups)
  and the train state of step 0."""
  model = ghl_jax.models.DeepHebb(num_classes=10, width=0.05)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  batch = {'image': images, 'label': jnp.arange(4) % 10}
  variables = model.init(jax.random.key(1), images[:1], train=False)
  rule = ghl_jax.Rule(t_inv=0.5)
  tx = ghl_jax.optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=0.05, total_steps=4, use_ghl=use_ghl,
                               rule=rule if use_ghl else None)
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params']), 'rng': jax.random.key(2)}
  return model, images, batch, variables, rule, tx, state


def test_the_train_step_logs_alignment_of_the_update_it_applies():
  model, images, batch, variables, rule, tx, state = deephebb_step_inputs(use_ghl=True)
  new, metrics = jax.jit(steps.make_train_step(model, tx, rule=rule))(state, batch)
  stats = metrics['stats']
  assert {k.split('/')[1] for k in stats if k.startswith('align/')} == {'conv1', 'conv2', 'conv3'}
  update = jax.tree.map(jnp.subtract, new['params'], state['params'])
  # The logged cos(−update, G) is the one of the step actually taken (decay included, so below cos(|Ĥ|, |G|)).
  def loss(p):
    logits, _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, images, train=True,
                            mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(jax.random.fold_in(state['rng'], 0), 0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  g = jax.grad(loss)(variables['params'])
  for name in ('conv1', 'conv3'):
    np.testing.assert_allclose(stats[f'align/{name}/cos_update'],
                               _np_cos(-np.asarray(update[name]['kernel']), g[name]['kernel']), rtol=1e-3, atol=1e-4)


def test_a_bp_step_with_a_shadow_logs_what_ghl_would_have_done_and_trains_as_plain_bp():
  """``shadow=rule``: the BP step's params are those of the plain BP step, and at log steps the logged
  alignment is that of the rule's terms (``value_and_grad`` on the same batch and dropout draw) with
  the step's gradient."""
  model, images, batch, variables, rule, tx, state = deephebb_step_inputs(use_ghl=False)
  plain, plain_metrics = jax.jit(steps.make_train_step(model, tx, rule=None))(state, batch)
  shadowed, metrics = jax.jit(steps.make_train_step(model, tx, rule=None, shadow=rule))(state, batch)
  chex.assert_trees_all_equal(shadowed['params'], plain['params'])
  assert not any(k.startswith('align/') for k in plain_metrics['stats'])
  stats = metrics['stats']
  assert {k for k in stats if k.startswith('align/conv1/')} == {
      'align/conv1/cos_magnitude', 'align/conv1/near_zero', 'align/conv1/top_overlap'}

  def loss(params, batch_stats, x, y, rng):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'], rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
  rng = jax.random.fold_in(jax.random.fold_in(state['rng'], 0), 0)
  _, grads, hebb = ghl_jax.value_and_grad(loss, rule, has_aux=True)(
      variables['params'], variables['batch_stats'], images, batch['label'], rng)
  for name in ('conv1', 'conv2', 'conv3'):
    h_hat = np.abs(np.asarray(hebb[f'{name}/kernel'].term))
    h_hat = h_hat / h_hat.max()
    np.testing.assert_allclose(stats[f'align/{name}/cos_magnitude'],
                               _np_cos(h_hat, np.abs(np.asarray(grads[name]['kernel']))), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(stats[f'align/{name}/near_zero'], np.mean(h_hat < 1e-3), atol=1e-6)
  with pytest.raises(ValueError, match='already applies GHL'):
    steps.make_train_step(model, tx, rule=rule, shadow=rule)
