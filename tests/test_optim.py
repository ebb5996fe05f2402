"""paper_sgd: one full GHL train step of DeepHebb against the paper's update, in numpy.

    conv kernels:  W ← W − η_conv · (sign(G) ⊙ |Ĥ| + λ_conv · W)     Ĥ from the numpy reference
    classifier:    θ ← θ − η · G
    η(t) = η₀ · ½(1 + cos(π t / T))
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import models, optim
import numpy_reference as ref

LR, LR_CONV, WD_CONV, TOTAL_STEPS = 5e-3, 1e-2, 5e-2, 100
T_INV = {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}
CONVS = ('conv1', 'conv2', 'conv3')


def loss_and_taps(model, params, batch_stats, images, labels, rng):
  (logits, state), taps = ghl_jax.tap(model.apply)(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'], rngs={'dropout': rng})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (state, taps)


@pytest.fixture(scope='module')
def step():
  """One jitted GHL step of DeepHebb (width 0.1, batch 8, 32×32): loss → grads → taps → update."""
  model = models.DeepHebb(num_classes=10, width=0.1)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  variables = model.init(jax.random.PRNGKey(1), images, train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optim.paper_sgd(lr=LR, lr_conv=LR_CONV, wd_conv=WD_CONV, total_steps=TOTAL_STEPS,
                       rule=ghl_jax.Rule(t_inv=T_INV))

  @jax.jit
  def train_step(params, opt_state, batch_stats, rng):
    grads, (state, taps) = jax.grad(loss_and_taps, argnums=1, has_aux=True)(
        model, params, batch_stats, images, labels, rng)
    updates, opt_state = tx.update(grads, opt_state, params, taps=taps)
    return optax.apply_updates(params, updates), updates, grads, taps, state

  new_params, updates, grads, taps, state = train_step(
      params, tx.init(params), batch_stats, jax.random.PRNGKey(2))
  return dict(model=model, images=images, params=params, new_params=new_params,
              updates=updates, grads=grads, taps=taps, state=state)


def test_conv_kernels_move_by_sign_g_times_numpy_h_hat_plus_decay(step):
  params, grads, taps = step['params'], step['grads'], step['taps']
  x = np.asarray(step['images'], np.float64)
  bn1 = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(taps['conv1']['inputs'], bn1, rtol=1e-4, atol=1e-4)
  for conv in CONVS:
    kernel = np.asarray(params[conv]['kernel'], np.float64)
    sites = ref.Sites(np.asarray(taps[conv]['inputs']), kernel, taps[conv]['layer'])
    h = ref.softmax_oja(sites, t_inv=T_INV[conv])
    expected = -LR_CONV * (ref.ghl_update(grads[conv]['kernel'], h) + WD_CONV * kernel)
    np.testing.assert_allclose(step['updates'][conv]['kernel'], expected, rtol=1e-5, atol=1e-8,
                               err_msg=conv)
    np.testing.assert_allclose(step['new_params'][conv]['kernel'], kernel + expected,
                               rtol=1e-6, atol=1e-7, err_msg=conv)


def test_classifier_moves_by_plain_sgd(step):
  for name in ('kernel', 'bias'):
    grad = np.asarray(step['grads']['classifier'][name], np.float64)
    np.testing.assert_allclose(step['updates']['classifier'][name], -LR * grad, rtol=1e-6, atol=1e-10)


def test_batch_stats_are_updated(step):
  assert set(step['state']) == {'batch_stats'}
  x = np.asarray(step['images'], np.float64)
  np.testing.assert_allclose(step['state']['batch_stats']['bn1']['mean'], 0.1 * x.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_use_ghl_false_is_plain_two_group_sgd(step):
  params, grads = step['params'], step['grads']
  tx = optim.paper_sgd(lr=LR, lr_conv=LR_CONV, wd_conv=WD_CONV, total_steps=TOTAL_STEPS,
                       use_ghl=False)
  with pytest.raises(ValueError, match=r"use_ghl=False\) trains by backprop and would ignore \['rule'\]"):
    optim.paper_sgd(lr=LR, lr_conv=LR_CONV, wd_conv=WD_CONV, total_steps=TOTAL_STEPS, use_ghl=False,
                    rule=ghl_jax.Rule())
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for conv in CONVS:
    expected = -LR_CONV * (np.asarray(grads[conv]['kernel'], np.float64) +
                           WD_CONV * np.asarray(params[conv]['kernel'], np.float64))
    np.testing.assert_allclose(updates[conv]['kernel'], expected, rtol=1e-5, atol=1e-10)
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(updates['classifier'][name],
                               -LR * np.asarray(grads['classifier'][name]), rtol=1e-6)


class TinyNet(nn.Module):
  """BN-free: conv → ReLU → mean-pool → classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), use_bias=False, name='conv')(x))
    return nn.Dense(2, name='classifier')(x.mean((1, 2)))


def test_cosine_schedule_starts_at_peak_and_reaches_zero():
  """Repeated updates with the same grads: update_t = −η(t)·(...) for both groups."""
  model = TinyNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 2))
  params = model.init(jax.random.PRNGKey(1), x)['params']

  def loss(p):
    logits, taps = ghl_jax.tap(model.apply)({'params': p}, x)
    return jnp.sum(logits ** 2), taps

  grads, taps = jax.grad(loss, has_aux=True)(params)
  total = 4
  tx = optim.paper_sgd(lr=0.2, lr_conv=0.1, wd_conv=0.5, total_steps=total)
  update = jax.jit(lambda s: tx.update(grads, s, params, taps=taps))
  kernel = np.asarray(params['conv']['kernel'], np.float64)
  sites = ref.Sites(np.asarray(x), kernel, taps['conv']['layer'])
  conv_direction = ref.ghl_update(grads['conv']['kernel'], ref.softmax_oja(sites)) + 0.5 * kernel
  state = tx.init(params)
  for t in range(total + 2):
    updates, state = update(state)
    factor = 0.5 * (1 + np.cos(np.pi * min(t, total) / total))
    np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * factor * conv_direction,
                               rtol=1e-5, atol=1e-8, err_msg=f'step {t}')
    np.testing.assert_allclose(updates['classifier']['kernel'],
                               -0.2 * factor * np.asarray(grads['classifier']['kernel']),
                               rtol=1e-5, atol=1e-8, err_msg=f'step {t}')
    if t == 0:
      assert factor == 1.0
    if t >= total:
      chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, updates), atol=0)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='wd_conv'):
    optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=-1.0, total_steps=10)
  with pytest.raises(ValueError, match='learning rates'):
    optim.paper_sgd(lr=0.0, lr_conv=0.1, wd_conv=0.0, total_steps=10)
  with pytest.raises(ValueError, match='total_steps'):
    optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=0.0, total_steps=0)
  tx = optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=0.0, total_steps=10, kernels='nothing_here')
  with pytest.raises(ValueError, match='No parameter matches'):
    tx.init({'dense': {'kernel': jnp.zeros((2, 2))}})
