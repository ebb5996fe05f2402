"""GHL on flax's general layers: nn.DenseGeneral, nn.Einsum, nn.ConvTranspose and stock attention.

The reference flattens each kernel by hand in numpy (contracted axes → inputs, kernel-only output
axes → neurons, input-only axes → sites, shared axes → separate layers) and applies GHL's rule in
float64: ``y = softmax(t_inv·u)``, ``H = yᵀx − (Σ y u) ⊙ W``.
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
import numpy_reference as ref

T_INV = 0.6


def np_softmax_oja(x, u, w, t_inv=T_INV):
  return ref.dense_softmax_oja(x, u, w, t_inv)


class Wrapped(nn.Module):
  layer: nn.Module

  def __call__(self, x):
    return self.layer(x)


# name -> (layer, input shape, numpy flattening of (x, u, W) into per-layer (sites,C), (sites,F), (C,F),
#          and the inverse map of H back to the kernel layout)
def _query(x, u, w):          # DenseGeneral(features=(3, 2)), axis=-1: x (b,t,d), W (d,h,k)
  return [(x.reshape(-1, x.shape[-1]), u.reshape(-1, 6), w.reshape(w.shape[0], 6))], lambda hs: hs[0].reshape(w.shape)


def _out(x, u, w):            # DenseGeneral(features=4, axis=(-2,-1)): x (b,t,h,k), W (h,k,e)
  c = w.shape[0] * w.shape[1]
  return [(x.reshape(-1, c), u.reshape(-1, w.shape[-1]), w.reshape(c, -1))], lambda hs: hs[0].reshape(w.shape)


def _batched(x, u, w):        # DenseGeneral(features=3, axis=-1, batch_dims=(0,)): x (g,s,d), W (g,d,f)
  return [(x[g], u[g], w[g]) for g in range(w.shape[0])], lambda hs: np.stack(hs)


def _heads(x, u, w):          # Einsum 'bhd,hdk->bhk': each head its own layer; x (b,h,d), W (h,d,k)
  return [(x[:, h], u[:, h], w[h]) for h in range(w.shape[0])], lambda hs: np.stack(hs)


def _mix(x, u, w):            # Einsum 'btd,dk->btk' with W (d,k)
  return [(x.reshape(-1, x.shape[-1]), u.reshape(-1, w.shape[-1]), w)], lambda hs: hs[0]


CASES = {
    'dense_general_query': (lambda: nn.DenseGeneral((3, 2), axis=-1), (2, 5, 4), _query),
    'dense_general_out': (lambda: nn.DenseGeneral(4, axis=(-2, -1)), (2, 5, 3, 2), _out),
    'dense_general_batch_dims': (lambda: nn.DenseGeneral(3, axis=-1, batch_dims=(0,), use_bias=False),
                                 (2, 5, 4), _batched),
    'einsum_heads': (lambda: nn.Einsum((3, 4, 2), 'bhd,hdk->bhk'), (5, 3, 4), _heads),
    'einsum_tokens': (lambda: nn.Einsum((4, 3), 'btd,dk->btk', use_bias=False), (2, 5, 4), _mix),
}


def _case(name):
  make, shape, flatten = CASES[name]
  net = Wrapped(make())
  x = jax.random.normal(jax.random.key(len(name)), shape)
  params = net.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(2), p.shape), params)
  return net, x, params, flatten


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
def test_term_is_the_rule_of_the_flattened_dense_layer(name, jit):
  net, x, params, flatten = _case(name)
  u = np.asarray(net.apply({'params': params}, x))
  w = np.asarray(params['layer']['kernel'])
  pieces, back = flatten(np.asarray(x), u, w)
  expected = back([np_softmax_oja(*piece) for piece in pieces])
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers='layer')

  taps_terms = lambda p: ghl_jax.hebbian_terms(p, ghl_jax.tap(net.apply)({'params': p}, x)[1], rule=rule)
  loss = lambda p: jnp.sum(jnp.square(net.apply({'params': p}, x)))
  fused = ghl_jax.value_and_grad(loss, rule)
  maybe_jit = jax.jit if jit else (lambda f: f)
  for terms in (maybe_jit(taps_terms)(params), maybe_jit(fused)(params)[2]):
    term = terms['layer/kernel']
    assert term.stacked == 0 and term.term.shape == w.shape
    np.testing.assert_allclose(term.term, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _query_per_head(x, u, w):  # as _query, but each of the 3 heads its own competition over k
  x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, *w.shape[1:])
  return [(x2, u2[:, h], w[:, h]) for h in range(w.shape[1])], lambda hs: np.stack(hs, axis=1)


PER_HEAD_CASES = {        # kernels with one output axis are the same layer either way
    'dense_general_query': (CASES['dense_general_query'][:2] + (_query_per_head,)),
    'einsum_heads': CASES['einsum_heads'], 'dense_general_out': CASES['dense_general_out'],
}


@pytest.mark.parametrize('name', sorted(PER_HEAD_CASES))
def test_per_head_competition_is_one_dense_layer_per_head(name):
  make, shape, flatten = PER_HEAD_CASES[name]
  net = Wrapped(make())
  x = jax.random.normal(jax.random.key(len(name)), shape)
  params = net.init(jax.random.key(1), x)['params']
  u = np.asarray(net.apply({'params': params}, x))
  w = np.asarray(params['layer']['kernel'])
  pieces, back = flatten(np.asarray(x), u, w)
  expected = back([np_softmax_oja(*piece) for piece in pieces])
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers='layer', per_head=True)
  assert rule.replace(t_inv=1.0).per_head and 'per_head=True' in repr(rule)
  loss = lambda p: jnp.sum(jnp.square(net.apply({'params': p}, x)))
  taps = ghl_jax.hebbian_terms(params, ghl_jax.tap(net.apply)({'params': params}, x)[1], rule=rule)
  for terms in (taps, jax.jit(ghl_jax.value_and_grad(loss, rule))(params)[2]):
    np.testing.assert_allclose(terms['layer/kernel'].term, expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_conv_transpose_fused_equals_taps():
  net = Wrapped(nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding='SAME'))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  params = net.init(jax.random.key(1), x)['params']
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers='layer')
  _, taps = ghl_jax.tap(net.apply)({'params': params}, x)
  expected = ghl_jax.hebbian_terms(params, taps, rule=rule)['layer/kernel'].term
  # Independent check of Σ y ⊗ x: the transposed conv is linear in W, so Σ_sites y·u(W) = <H_hebb, W>.
  u = net.apply({'params': params}, x)
  hebb = ghl_jax.hebbian_terms(params, taps, rule=ghl_jax.Rule('hebb', layers='layer'))['layer/kernel'].term
  np.testing.assert_allclose(jnp.sum(hebb * params['layer']['kernel']),
                             jnp.sum(u * (u - params['layer']['bias'])), rtol=1e-4)
  _, _, fused = jax.jit(ghl_jax.value_and_grad(lambda p: jnp.sum(net.apply({'params': p}, x)), rule))(params)
  np.testing.assert_allclose(fused['layer/kernel'].term, expected, rtol=1e-4, atol=1e-6)


class Attention(nn.Module):
  """A token model on flax's stock attention: embed → attention → dense head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Dense(8, name='embed')(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(x)
    return nn.Dense(3, name='head')(x.mean(axis=1))


def test_stock_attention_ghl_step_matches_numpy():
  model = Attention()
  tokens = jax.random.normal(jax.random.key(0), (2, 5, 4))
  labels = jnp.array([0, 2])
  params = model.init(jax.random.key(1), tokens)['params']
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers=r'attn/(query|key|value|out)')
  tx = optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(0.1))

  def loss_fn(p):
    logits = model.apply({'params': p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  _, grads, hebb = jax.jit(ghl_jax.value_and_grad(loss_fn, rule))(params)
  assert sorted(hebb) == [f'attn/{k}/kernel' for k in ('key', 'out', 'query', 'value')]
  updates, _ = tx.update(grads, tx.init(params), params, hebb=hebb)

  _, taps = ghl_jax.tap(model.apply)({'params': params}, tokens)
  for name in ('query', 'key', 'value', 'out'):
    entry, w = taps['attn'][name], np.asarray(params['attn'][name]['kernel'])
    x, u = np.asarray(entry['inputs']), np.asarray(entry['outputs'])
    c = int(np.prod(w.shape[:-1])) if name == 'out' else w.shape[0]
    h = np_softmax_oja(x.reshape(-1, c), u.reshape(u.shape[0] * u.shape[1], -1), w.reshape(c, -1))
    h = h.reshape(w.shape)
    h_hat = h / np.abs(h).max()
    g = np.asarray(grads['attn'][name]['kernel'])
    np.testing.assert_allclose(updates['attn'][name]['kernel'], -0.1 * np.sign(g) * np.abs(h_hat),
                               rtol=1e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1 * grads['head']['kernel'], rtol=1e-6)


class LocalNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.ConvLocal(2, (3, 3), name='local')(x)
    return nn.Conv(2, (3, 3), name='conv')(x)


def test_uninterpretable_kernel_is_an_error_when_selected_and_logged_by_default(caplog):
  net = LocalNet()
  x = jnp.ones((1, 5, 5, 2))
  params = net.init(jax.random.key(0), x)['params']
  loss = lambda p: jnp.sum(net.apply({'params': p}, x))
  with pytest.raises(ValueError, match='local/kernel, the kernel of an ConvLocal, which GHL cannot read'):
    ghl_jax.value_and_grad(loss, ghl_jax.Rule(layers='local|conv'))(params)
  with caplog.at_level(logging.WARNING, logger='ghl_jax'):
    _, _, hebb = ghl_jax.value_and_grad(loss, ghl_jax.Rule())(params)
  assert sorted(hebb) == ['conv/kernel']
  assert 'local/kernel (ConvLocal)' in caplog.text
