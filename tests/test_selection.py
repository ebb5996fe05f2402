"""What GHL governs: one selection, never silent, right on the patterns of real flax models.

Each model here is written in the style of a real one (an lm1b-style Transformer with logical
partitioning, an NNX decoder with ``nnx.Einsum`` and grouped-query attention, a ViT with
``nn.scan(nn.remat(...))`` and a head called twice, a flax-examples ResNet with BatchNorm); each
update is checked against a numpy reference of the rule written from the equations.
"""
import re

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import optim
import numpy_reference as ref

T_INV = 0.6


def np_softmax_oja(x, u, w, t_inv=T_INV):
  return ref.dense_softmax_oja(x, u, w, t_inv)


def np_update(grad, h, lr=0.1):
  """SGD(lr) after GHL: ``-lr · sign(G) ⊙ |H / max|H||``."""
  return -lr * np.sign(np.asarray(grad)) * np.abs(h / np.abs(h).max())


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ------------------------------------------------------------------------------------------------
# lm1b-style Transformer: stock attention, Dense MLP, kernels boxed by logical partitioning.

def _boxed(*names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Lm1bBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, kernel_init=_boxed('embed', 'heads', 'kv'),
                                        name='attn')(nn.LayerNorm(name='ln1')(x))
    x = x + h
    h = nn.Dense(16, kernel_init=_boxed('embed', 'mlp'), name='mlp_in')(nn.LayerNorm(name='ln2')(x))
    return x + nn.Dense(8, kernel_init=_boxed('mlp', 'embed'), name='mlp_out')(nn.relu(h))


class Lm1b(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8, name='embed')(tokens)
    x = Lm1bBlock(name='block')(x)
    return nn.Dense(11, kernel_init=_boxed('embed', 'vocab'), name='logits')(x)


def _lm1b():
  model = Lm1b()
  tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
  params = model.init(jax.random.key(1), tokens)['params']
  loss = lambda p: _xent(model.apply({'params': p}, tokens), tokens)
  return model, tokens, params, loss


def test_default_rule_on_a_model_without_convolutions_is_an_error_that_lists_its_kernels():
  _, _, params, loss = _lm1b()
  with pytest.raises(ValueError, match=r'governs every convolution kernel and the model has none.*'
                                       r'block/mlp_in/kernel'):
    ghl_jax.value_and_grad(loss, ghl_jax.Rule())(params)


def test_lm1b_style_transformer_with_logical_partitioning():
  model, tokens, params, loss = _lm1b()
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers=r'block/(mlp_in|attn/query)')
  tx = optax.chain(ghl_jax.ghl(), optax.sgd(0.1))
  _, grads, hebb = jax.jit(ghl_jax.value_and_grad(loss, rule))(params)
  assert sorted(hebb) == ['block/attn/query/kernel', 'block/mlp_in/kernel']
  updates, _ = tx.update(grads, tx.init(params), params, hebb=hebb)
  # The sharding annotations survive ghl() and the optimizer.
  for path in ('block/mlp_in/kernel', 'block/attn/query/kernel', 'logits/kernel'):
    leaf, given = ghl_jax.trees.get(updates, path), ghl_jax.trees.get(params, path)
    assert isinstance(leaf, nn.Partitioned) and leaf.names == given.names, path
  _, taps = ghl_jax.tap(model.apply)({'params': params}, tokens)
  entry = taps['block']['mlp_in']
  h = np_softmax_oja(np.reshape(entry['inputs'], (-1, 8)), np.reshape(entry['outputs'], (-1, 16)),
                     params['block']['mlp_in']['kernel'].value)
  np.testing.assert_allclose(updates['block']['mlp_in']['kernel'].value,
                             np_update(grads['block']['mlp_in']['kernel'].value, h), rtol=1e-4, atol=1e-6)
  entry, w = taps['block']['attn']['query'], params['block']['attn']['query']['kernel'].value
  h = np_softmax_oja(np.reshape(entry['inputs'], (-1, 8)), np.reshape(entry['outputs'], (10, -1)),
                     np.reshape(w, (8, -1))).reshape(w.shape)
  np.testing.assert_allclose(updates['block']['attn']['query']['kernel'].value,
                             np_update(grads['block']['attn']['query']['kernel'].value, h), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updates['logits']['kernel'].value, -0.1 * grads['logits']['kernel'].value, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# An NNX decoder with nnx.Einsum called with its equation, and grouped-query attention.

D, HEADS, KV_HEADS, HEAD_DIM = 8, 4, 2, 3


class NnxDecoder(nnx.Module):
  def __init__(self, rngs):
    # Built with other layouts than the calls use (q's would make each head a layer of its own).
    self.q = nnx.Einsum('BND,NDH->BNH', (HEADS, D, HEAD_DIM), rngs=rngs)
    self.kv = nnx.Einsum('BSD,CKDH->CBSKH', (2, KV_HEADS, D, HEAD_DIM), rngs=rngs)
    self.o = nnx.Einsum('BNH,NHD->BD', (HEADS, HEAD_DIM, D), rngs=rngs)
    self.head = nnx.Linear(D, 5, rngs=rngs)

  def __call__(self, x):
    q = self.q(x, 'BTD,NDH->BTNH')
    k, v = jnp.split(self.kv(x, 'BSD,CKDH->CBSKH'), 2)
    k, v = (jnp.repeat(a[0], HEADS // KV_HEADS, axis=2) for a in (k, v))     # grouped-query attention
    weights = jax.nn.softmax(jnp.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(HEAD_DIM), axis=-1)
    x = x + self.o(jnp.einsum('BNTS,BSNH->BTNH', weights, v), 'BTNH,NHD->BTD')
    return self.head(x.mean(axis=1))


class LinenDecoder(nn.Module):
  """The same decoder in linen (nn.Einsum with the equation given at the call)."""

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((HEADS, D, HEAD_DIM), use_bias=False, name='q')(x, 'BTD,NDH->BTNH')
    k, v = jnp.split(nn.Einsum((2, KV_HEADS, D, HEAD_DIM), use_bias=False, name='kv')(x, 'BSD,CKDH->CBSKH'), 2)
    k, v = (jnp.repeat(a[0], HEADS // KV_HEADS, axis=2) for a in (k, v))
    weights = jax.nn.softmax(jnp.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(HEAD_DIM), axis=-1)
    x = x + nn.Einsum((HEADS, HEAD_DIM, D), use_bias=False, name='o')(jnp.einsum('BNTS,BSNH->BTNH', weights, v), 'BTNH,NHD->BTD')
    return nn.Dense(5, name='head')(x.mean(axis=1))


def test_nnx_decoder_with_call_time_einsum_and_gqa_matches_numpy_and_linen():
  model = NnxDecoder(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, D))
  labels = jnp.array([1, 3])
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers=r'^(q|o)/kernel$')
  with pytest.raises(ValueError, match='governs every convolution kernel and the model has none'):
    ghl_jax.nnx.value_and_grad(lambda m: _xent(m(x), labels), ghl_jax.Rule())(model)
  _, _, hebb = ghl_jax.nnx.value_and_grad(lambda m: _xent(m(x), labels), rule)(model)
  assert sorted(hebb) == ['o/kernel', 'q/kernel']
  w = np.asarray(model.q.kernel[...])                                   # (N, D, H)
  u = np.einsum('btd,ndh->btnh', x, w)
  h = np_softmax_oja(np.reshape(x, (-1, D)), u.reshape(8, -1), w.transpose(1, 0, 2).reshape(D, -1))
  np.testing.assert_allclose(hebb['q/kernel'].term, h.reshape(D, HEADS, HEAD_DIM).transpose(1, 0, 2),
                             rtol=1e-4, atol=1e-6)
  linen = LinenDecoder()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _, _, linen_hebb = ghl_jax.value_and_grad(lambda p: _xent(linen.apply({'params': p}, x), labels), rule)(params)
  for path in hebb:
    np.testing.assert_allclose(hebb[path].term, linen_hebb[path].term, rtol=1e-5, atol=1e-6, err_msg=path)


# ------------------------------------------------------------------------------------------------
# A ViT: nn.scan over nn.remat blocks, and a head applied twice (its second output not in the loss).

class VitBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.gelu(nn.Dense(8, name='mlp')(nn.LayerNorm(name='ln')(x))), None


class Vit(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(8, (2, 2), strides=2, name='embedding')(images)
    x = x.reshape(x.shape[0], -1, 8)
    blocks = nn.scan(nn.remat(VitBlock), variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True}, length=2)
    x, _ = blocks(name='encoder')(x, None)
    head = nn.Dense(3, name='head')
    return head(x.mean(axis=1)), head(x)                      # logits, per-token logits (not in the loss)


def test_vit_scan_over_remat_and_a_head_called_twice():
  model = Vit()
  images = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  labels = jnp.array([0, 2])
  params = model.init(jax.random.key(1), images)['params']
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers='embedding|encoder|head')

  def loss(p):
    logits, per_token = model.apply({'params': p}, images)
    return _xent(logits, labels), per_token
  (_, _), grads, hebb = jax.jit(ghl_jax.value_and_grad(loss, rule, has_aux=True))(params)
  assert hebb['encoder/mlp/kernel'].stacked == 1
  (_, _), taps = ghl_jax.tap(model.apply)({'params': params}, images)
  entry, w = taps['head'], params['head']['kernel']
  h = sum(np_softmax_oja(np.reshape(x, (-1, 8)), np.reshape(u, (-1, 3)), w)
          for x, u in zip(entry['inputs'], entry['outputs']))       # both calls count
  np.testing.assert_allclose(hebb['head/kernel'].term, h, rtol=1e-4, atol=1e-6)
  reference = ghl_jax.hebbian_terms(params, taps, rule=rule)        # the taps path sums both calls too
  for path in hebb:
    np.testing.assert_allclose(hebb[path].term, reference[path].term, rtol=1e-4, atol=1e-6, err_msg=path)
  tx = optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(params), params, hebb=hebb)
  np.testing.assert_allclose(updates['head']['kernel'], np_update(grads['head']['kernel'], h), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# A flax-examples-style ResNet with BatchNorm: the default rule governs every convolution.

class ResNetBlock(nn.Module):
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name='conv_proj')(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=False, name='conv_init')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn_init')(x))
    x = ResNetBlock(4)(x, train)
    x = ResNetBlock(8, strides=2)(x, train)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_flax_examples_resnet_with_batch_norm():
  model = ResNet()
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  labels = jnp.array([3, 7])
  variables = model.init(jax.random.key(1), images, train=False)
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV)

  def loss(params, batch_stats):
    logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, images, mutable=['batch_stats'])
    return _xent(logits, labels), state
  grad_fn = ghl_jax.value_and_grad(loss, rule, has_aux=True)
  selection = grad_fn.selection(variables['params'], variables['batch_stats'])
  assert len(selection.paths) == 6 and 'Dense_0/kernel' not in selection.paths
  assert 'not a convolution' in selection.table()
  (_, state), grads, hebb = jax.jit(grad_fn)(variables['params'], variables['batch_stats'])
  tx = optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=0.0, total_steps=10, rule=rule, kernels=selection)
  updates, _ = tx.update(grads, tx.init(variables['params']), variables['params'], hebb=hebb)
  (_, _), taps = ghl_jax.tap(model.apply)(variables, images, mutable=['batch_stats'])
  for path in ('conv_init/kernel', 'ResNetBlock_1/conv_proj/kernel', 'ResNetBlock_1/Conv_0/kernel'):
    entry = ghl_jax.trees.get(taps, path.rsplit('/', 1)[0])
    kernel = np.asarray(ghl_jax.trees.get(variables['params'], path))
    h = ref.softmax_oja(ref.Sites(np.asarray(entry['inputs']), kernel, entry['layer']), t_inv=T_INV)
    np.testing.assert_allclose(ghl_jax.trees.get(updates, path),
                               np_update(ghl_jax.trees.get(grads, path), h),
                               rtol=1e-4, atol=1e-6, err_msg=path)
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])


# ------------------------------------------------------------------------------------------------
# Every formerly silent case is one error line.

class SmallConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), name='stem')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    return nn.Dense(3, name='classifier')(x.mean(axis=(1, 2)))


@pytest.fixture(name='convnet')
def _convnet():
  model = SmallConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params, batch_stats):
    out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])
    return jnp.sum(out ** 2)
  return model, x, variables, loss


def _one_line(error):
  assert '\n' not in str(error.value)


def test_a_t_inv_key_that_matches_no_governed_kernel(convnet):
  _, _, variables, loss = convnet
  with pytest.raises(ValueError, match=re.escape("t_inv keys ['stem2'] match no governed kernel")) as error:
    ghl_jax.value_and_grad(loss, ghl_jax.Rule(t_inv={'stem2': 0.5}))(variables['params'], variables['batch_stats'])
  _one_line(error)


def test_hebb_keys_that_are_not_leaves_of_the_updates(convnet):
  model, x, variables, _ = convnet
  loss = lambda v: jnp.sum(model.apply(v, x, mutable=['batch_stats'])[0] ** 2)
  rule = ghl_jax.Rule()
  _, grads, hebb = ghl_jax.value_and_grad(loss, rule)(variables)     # the whole variables dict
  assert sorted(hebb) == ['params/stem/kernel']
  tx = ghl_jax.ghl(rule=rule)
  with pytest.raises(ValueError, match='not leaves of the updates') as error:
    tx.update(grads['params'], tx.init(variables['params']), variables['params'], hebb=hebb)
  _one_line(error)


def test_taps_and_hebb_together(convnet):
  model, x, variables, loss = convnet
  rule = ghl_jax.Rule()
  _, grads, hebb = ghl_jax.value_and_grad(loss, rule)(variables['params'], variables['batch_stats'])
  (_, _), taps = ghl_jax.tap(model.apply)(variables, x, mutable=['batch_stats'])
  tx = ghl_jax.ghl(rule=rule)
  with pytest.raises(ValueError, match='hebb= or taps=, not both'):
    tx.update(grads, tx.init(variables['params']), variables['params'], hebb=hebb, taps=taps)


def test_argnums_on_a_tree_without_kernels(convnet):
  _, _, variables, loss = convnet
  with pytest.raises(ValueError, match='argnums=1 holds none of the model\'s kernels') as error:
    ghl_jax.value_and_grad(loss, ghl_jax.Rule(), argnums=1)(variables['params'], variables['batch_stats'])
  _one_line(error)


def test_a_second_rule_given_to_ghl(convnet):
  _, _, variables, loss = convnet
  made_with = ghl_jax.Rule(t_inv=0.5)
  _, grads, hebb = ghl_jax.value_and_grad(loss, made_with)(variables['params'], variables['batch_stats'])
  state = ghl_jax.ghl().init(variables['params'])
  same, _ = ghl_jax.ghl(rule=made_with).update(grads, state, variables['params'], hebb=hebb)
  taken, _ = ghl_jax.ghl().update(grads, state, variables['params'], hebb=hebb)      # the terms' own Rule
  np.testing.assert_array_equal(same['stem']['kernel'], taken['stem']['kernel'])
  with pytest.raises(ValueError, match='differs from the Rule the terms were made with'):
    ghl_jax.ghl(rule=ghl_jax.Rule(t_inv=0.7)).update(grads, state, variables['params'], hebb=hebb)
  with pytest.warns(DeprecationWarning, match='deprecated'):
    ghl_jax.ghl(t_inv=0.5)


def test_a_governed_kernel_that_the_optimizer_trains_in_another_group(convnet):
  _, _, variables, loss = convnet
  rule = ghl_jax.Rule(layers='stem|classifier')
  _, grads, hebb = ghl_jax.value_and_grad(loss, rule)(variables['params'], variables['batch_stats'])
  tx = optim.paper_sgd(lr=0.1, lr_conv=0.1, wd_conv=0.0, total_steps=5, rule=rule, kernels='stem')
  with pytest.raises(ValueError, match=re.escape("kernels ['classifier/kernel'] have Hebbian terms but another "
                                                 'optimizer group trains them')):
    tx.update(grads, tx.init(variables['params']), variables['params'], hebb=hebb)


def test_selection_table_shows_every_kernel(convnet):
  model, x, _, _ = convnet
  selection = ghl_jax.selection.of_model(ghl_jax.Rule(t_inv=0.5), model, x, train=False)
  rows = {row[0]: row[2] for row in selection.rows()}
  assert rows == {'stem/kernel': 'softmax_oja t_inv=0.5',
                  'classifier/kernel': 'not governed: not a convolution (the default governs nn.Conv kernels)'}
  assert selection.table().splitlines()[0].split() == ['kernel', 'layer', 'GHL']


class NnxTwiceHead(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(4, 6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.body(x))
    return self.head(h.mean(axis=1)), self.head(h)             # the second output is not in the loss


def test_nnx_layer_called_twice_sums_both_calls():
  model = NnxTwiceHead(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  labels = jnp.array([0, 2])
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV, layers='head')

  def loss(m):
    logits, per_token = m(x)
    return _xent(logits, labels), per_token
  (_, _), _, hebb = ghl_jax.nnx.value_and_grad(loss, rule, has_aux=True)(model)
  h = np.maximum(np.einsum('btc,cf->btf', x, model.body.kernel[...]) + model.body.bias[...], 0)
  w = np.asarray(model.head.kernel[...])
  calls = [(h.mean(axis=1), h.mean(axis=1) @ w), (h.reshape(-1, 6), h.reshape(-1, 6) @ w)]
  expected = sum(np_softmax_oja(a, u + np.asarray(model.head.bias[...]), w) for a, u in calls)
  np.testing.assert_allclose(hebb['head/kernel'].term, expected, rtol=1e-4, atol=1e-6)
