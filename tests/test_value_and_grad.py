"""``ghl_jax.value_and_grad`` (the public fused path) equals the taps path for every registered rule.

The reference is the v1 path: ``ghl_jax.tap`` under ``jax.value_and_grad`` with XLA's own
convolutions, then ``ghl_jax.hebbian_terms`` (itself checked against numpy im2col references in
``test_rules.py``). Every rule of ``rules.RULES`` is covered by construction (the cases are built
from the registry), on Dense and N-d Conv layers of every geometry, on both kernel sets
('gemm': the Hebbian product over the conv's patches; 'xla': the layer's vjp), with and without
``jit``, and on ``nn.scan``-stacked kernels.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import rules
from ghl_jax.models.layers import Repeatable, run_repeated

# name -> (module factory, input shape)
LAYERS = {
    'dense_2d': (lambda: nn.Dense(5), (6, 4)),
    'dense_tokens': (lambda: nn.Dense(5, use_bias=False), (2, 3, 4)),
    'conv_same_bias': (lambda: nn.Conv(5, (3, 3), padding='SAME'), (2, 6, 5, 3)),
    'conv_stride2': (lambda: nn.Conv(4, (3, 2), strides=(2, 1), padding='VALID', use_bias=False), (2, 7, 6, 3)),
    'conv_explicit_dilated': (lambda: nn.Conv(4, (3, 3), kernel_dilation=2, padding=((2, 1), (1, 2))),
                              (2, 7, 7, 2)),
    'conv_groups': (lambda: nn.Conv(6, (3, 3), feature_group_count=2, padding='SAME'), (2, 5, 5, 4)),
    'conv_1d': (lambda: nn.Conv(4, (3,), strides=2, padding='SAME', use_bias=False), (2, 9, 3)),
    'conv_3d': (lambda: nn.Conv(3, (2, 2, 2), padding='SAME', use_bias=False), (1, 4, 4, 3, 2)),
    'conv_reflect': (lambda: nn.Conv(4, (3, 3), padding='REFLECT', use_bias=False), (2, 6, 6, 2)),
    'conv_input_dilation': (lambda: nn.Conv(4, (3, 3), input_dilation=2, padding=1, use_bias=False),
                            (2, 4, 4, 2)),
}
EAGER = ('dense_2d', 'conv_groups')           # also run without jit (slow: op by op)
# Settings other than the defaults where a rule has them.
HYPER = {'softmax_oja': {'t_inv': 0.7}, 'softhebb': {'t_inv': 0.8}, 'swta': {'t_inv': 2.0}}


def squared_input_hebb(x, u, kernel, layer):
  """A rule that asks for ``Σ u ⊗ x²``: the product of something other than the layer's input."""
  return layer.kernel_product(jnp.square(x.astype(jnp.float32)), u.astype(jnp.float32), kernel.shape)


ALL_RULES = {**rules.RULES, 'squared_input_hebb': squared_input_hebb}


class Net(nn.Module):
  """The layer under test, as the submodule ``layer``."""
  layer: nn.Module

  def __call__(self, x):
    return self.layer(x)


def _setup(layer_name):
  make, shape = LAYERS[layer_name]
  net = Net(make())
  x = jax.random.normal(jax.random.key(len(layer_name)), shape)
  params = net.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  target = jax.random.normal(jax.random.key(3), net.apply({'params': params}, x).shape)
  return net, x, params, target


def _rule(name):
  return ghl_jax.Rule(name if name in rules.RULES else ALL_RULES[name], layers='layer', **HYPER.get(name, {}))


def _reference(net, x, params, target, rule):
  def loss(p):
    u, taps = ghl_jax.tap(net.apply)({'params': p}, x)
    return jnp.sum(jnp.square(u - target)), taps
  (value, taps), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, grads, ghl_jax.hebbian_terms(params, taps, rule=rule)


@pytest.mark.parametrize('layer_name', sorted(LAYERS))
@pytest.mark.parametrize('rule_name', sorted(ALL_RULES))
def test_fused_terms_equal_taps_terms(rule_name, layer_name):
  net, x, params, target = _setup(layer_name)
  rule = _rule(rule_name)
  value, grads, hebb = _reference(net, x, params, target, rule)
  loss = lambda p, x: jnp.sum(jnp.square(net.apply({'params': p}, x) - target))
  eager = (('gemm', False),) if layer_name in EAGER else ()
  xla = (('xla', True),) if layer_name.startswith('conv') else ()    # Dense: one path on both
  for impl, jit in (('gemm', True),) + xla + eager:
    grad_fn = ghl_jax.value_and_grad(loss, rule, conv_impl=impl)
    f_value, f_grads, f_hebb = (jax.jit(grad_fn) if jit else grad_fn)(params, x)
    assert sorted(f_hebb) == sorted(hebb) == ['layer/kernel']
    expected = np.asarray(hebb['layer/kernel'].term)
    actual = f_hebb['layer/kernel']
    assert actual.stacked == 0 and actual.term.dtype == jnp.float32
    np.testing.assert_allclose(actual.term, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max(),
                               err_msg=f'{impl} jit={jit}')
    np.testing.assert_allclose(f_value, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), f_grads, grads)


class _Block(Repeatable):
  kind: str = 'conv'

  @nn.compact
  def __call__(self, x):
    layer = nn.Conv(x.shape[-1], (3, 3), padding=1, name='mix') if self.kind == 'conv' else nn.Dense(
        x.shape[-1], name='mix')
    return nn.tanh(layer(x))


class Stacked(nn.Module):
  kind: str = 'conv'

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), name='stem')(x)
    x = run_repeated(_Block, 3, x, name='blocks', kind=self.kind)
    return nn.Dense(4, name='head')(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('kind', ['conv', 'dense'])
@pytest.mark.parametrize('rule_name', sorted(rules.RULES))
def test_scan_stacked_kernels(rule_name, kind):
  model = Stacked(kind)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  params = model.init(jax.random.key(1), x)['params']
  rule = ghl_jax.Rule(rule_name, layers='stem|mix|head', **HYPER.get(rule_name, {}))
  loss = lambda p: jnp.sum(jnp.square(model.apply({'params': p}, x)))
  taps_loss = lambda p: (lambda out: (jnp.sum(jnp.square(out[0])), out[1]))(ghl_jax.tap(model.apply)({'params': p}, x))
  (_, taps), grads = jax.value_and_grad(taps_loss, has_aux=True)(params)
  expected = ghl_jax.hebbian_terms(params, taps, rule=rule)
  _, f_grads, hebb = jax.jit(ghl_jax.value_and_grad(loss, rule))(params)
  assert sorted(hebb) == sorted(expected) == ['blocks/mix/kernel', 'head/kernel', 'stem/kernel']
  assert hebb['blocks/mix/kernel'].stacked == 1 and hebb['blocks/mix/kernel'].term.shape[0] == 3
  for path, term in expected.items():
    np.testing.assert_allclose(hebb[path].term, term.term, rtol=2e-4, atol=2e-5 * np.abs(term.term).max(),
                               err_msg=path)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), f_grads, grads)


def test_readme_loop_with_variables_dict_argnums_and_aux():
  """``value_and_grad`` over a variables dict, a second argument, aux; ``rule=None`` is backprop."""
  model = ghl_jax.models.DeepHebb(width=0.05)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 10
  variables = model.init(jax.random.key(1), x, train=False)
  rule = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25})

  def loss_fn(variables, images):
    logits, state = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(3)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

  (loss, state), grads, hebb = jax.jit(ghl_jax.value_and_grad(loss_fn, rule, has_aux=True))(variables, x)
  assert sorted(hebb) == ['params/conv1/kernel', 'params/conv2/kernel', 'params/conv3/kernel']
  (bp_loss, _), bp_grads, none = jax.jit(ghl_jax.value_and_grad(loss_fn, None, has_aux=True))(variables, x)
  assert none == {} and 'batch_stats' in state
  np.testing.assert_allclose(loss, bp_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, bp_grads)
  (_, _), (g0, g1), hebb2 = jax.jit(ghl_jax.value_and_grad(loss_fn, rule, has_aux=True, argnums=(0, 1)))(
      variables, x)
  assert g1.shape == x.shape and sorted(hebb2) == sorted(hebb)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, grads)
  for path in hebb:
    scale = float(jnp.abs(hebb[path].term).max())
    np.testing.assert_allclose(hebb2[path].term, hebb[path].term, rtol=1e-4, atol=1e-5 * scale)

  tx = optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(0.1))
  params_grads = grads['params']
  updates, _ = tx.update(params_grads, tx.init(variables['params']), variables['params'],
                         hebb={k[len('params/'):]: v for k, v in hebb.items()})
  h_hat = hebb['params/conv2/kernel'].normalized()
  np.testing.assert_allclose(updates['conv2']['kernel'],
                             -0.1 * np.sign(params_grads['conv2']['kernel']) * np.abs(h_hat), rtol=1e-6)


def test_bad_arguments_are_one_line_errors():
  loss = lambda p: jnp.sum(p['kernel'])
  with pytest.raises(TypeError, match='ghl_jax.Rule'):
    ghl_jax.value_and_grad(loss, 'softmax_oja')
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    ghl_jax.value_and_grad(loss, ghl_jax.Rule(), conv_impl='cudnn')
  net, x, params, target = _setup('dense_2d')
  f = lambda p: jnp.sum(net.apply({'params': p}, x))
  with pytest.raises(ValueError, match='selects no kernel'):
    ghl_jax.value_and_grad(f, ghl_jax.Rule(layers='nothing_here'))(params)
