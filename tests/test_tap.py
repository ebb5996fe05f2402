"""ghl_jax.tap: inputs/outputs of every nn.Conv / nn.Dense call, through flax transforms.

Tapped arrays are checked against a manual numpy forward pass (explicit im2col convolution).
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghl_jax
import numpy_reference as ref


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(3, (3, 3), padding='VALID', use_bias=False, name='conv')(x)


class Net(nn.Module):
  """stem conv (stride 2, SAME) → ReLU → block/conv (VALID) → ReLU → flatten → head (Dense)."""
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding='SAME', name='stem')(x))
    block = nn.remat(Block) if self.remat else Block
    x = nn.relu(block(name='block')(x))
    return nn.Dense(5, name='head')(x.reshape(x.shape[0], -1))


def _images(batch=2, size=8, channels=3, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, channels))


@pytest.fixture(scope='module')
def net():
  model = Net()
  x = _images()
  return model, model.init(jax.random.PRNGKey(1), x), x


def manual_forward(params, x):
  """Numpy forward pass of ``Net``: ``{path: (inputs, outputs)}`` and the logits."""
  x = np.asarray(x, np.float64)
  calls = {}
  stem = ref.Sites(x, params['stem']['kernel'], ref.Geometry((3, 3), 2, 'SAME'),
                   params['stem']['bias']).outputs()
  calls['stem'] = (x, stem)
  h = np.maximum(stem, 0)
  conv = ref.Sites(h, params['block']['conv']['kernel'], ref.Geometry((3, 3), 1, 'VALID')).outputs()
  calls['block/conv'] = (h, conv)
  h = np.maximum(conv, 0).reshape(x.shape[0], -1)
  logits = h @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  calls['head'] = (h, logits)
  return calls, logits


def _entry(taps, path):
  for key in path.split('/'):
    taps = taps[key]
  return taps


def test_every_conv_and_dense_is_tapped_with_its_inputs_and_outputs(net):
  model, variables, x = net
  logits, taps = ghl_jax.tap(model.apply)(variables, x)
  calls, expected_logits = manual_forward(variables['params'], x)
  assert set(taps) == {'stem', 'block', 'head'} and set(taps['block']) == {'conv'}
  for path, (inputs, outputs) in calls.items():
    entry = _entry(taps, path)
    np.testing.assert_allclose(entry['inputs'], inputs, rtol=1e-5, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(entry['outputs'], outputs, rtol=1e-5, atol=1e-5, err_msg=path)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  assert taps['stem']['layer'].module_type is nn.Conv and taps['stem']['layer'].is_conv
  assert taps['head']['layer'].module_type is nn.Dense and not taps['head']['layer'].is_conv
  assert dict(taps['stem']['layer'].fields)['strides'] == 2


def test_types_restricts_the_tapped_modules(net):
  model, variables, x = net
  _, taps = ghl_jax.tap(model.apply, types=(nn.Dense,))(variables, x)
  assert set(taps) == {'head'}


def test_under_jit_equals_eager(net):
  model, variables, x = net
  eager = ghl_jax.tap(model.apply)(variables, x)
  jitted = jax.jit(lambda v, images: ghl_jax.tap(model.apply)(v, images))(variables, x)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_under_grad_with_aux(net):
  model, variables, x = net

  def tapped_loss(params):
    logits, taps = ghl_jax.tap(model.apply)({'params': params}, x)
    return jnp.sum(logits ** 2), taps

  def plain_loss(params):
    return jnp.sum(model.apply({'params': params}, x) ** 2)

  grads, taps = jax.jit(jax.grad(tapped_loss, has_aux=True))(variables['params'])
  chex.assert_trees_all_close(grads, jax.grad(plain_loss)(variables['params']), rtol=1e-6)
  calls, _ = manual_forward(variables['params'], x)
  for path, (inputs, outputs) in calls.items():
    np.testing.assert_allclose(_entry(taps, path)['inputs'], inputs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_entry(taps, path)['outputs'], outputs, rtol=1e-5, atol=1e-5)


def test_under_remat_equals_plain(net):
  _, variables, x = net

  def grads_and_taps(model):
    def loss(params):
      logits, taps = ghl_jax.tap(model.apply)({'params': params}, x)
      return jnp.sum(logits ** 2), taps
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  chex.assert_trees_all_close(grads_and_taps(Net(remat=True)), grads_and_taps(Net()),
                              rtol=1e-6, atol=1e-6)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(3, name='fc')(carry)), None


class Stack(nn.Module):
  """Four Dense blocks under nn.scan; 'intermediates' stacked along axis 0."""
  length: int = 4

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(ScanBlock, variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True}, length=self.length)
    x, _ = blocks(name='blocks')(x, None)
    return x


def test_under_scan_taps_are_stacked_per_block():
  model = Stack()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  out, taps = jax.jit(ghl_jax.tap(model.apply))(variables, x)
  entry = taps['blocks']['fc']
  assert entry['inputs'].shape == (4, 2, 3) and entry['outputs'].shape == (4, 2, 3)
  assert variables['params']['blocks']['fc']['kernel'].shape == (4, 3, 3)
  fc = variables['params']['blocks']['fc']
  h = np.asarray(x, np.float64)
  for block in range(4):
    u = h @ np.asarray(fc['kernel'][block]) + np.asarray(fc['bias'][block])
    np.testing.assert_allclose(entry['inputs'][block], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entry['outputs'][block], u, rtol=1e-5, atol=1e-6)
    h = np.tanh(u)
  np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(x)
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(2, name='head')(x.reshape(x.shape[0], -1))


def test_batch_stats_and_dropout_pass_through_like_flax():
  model = BatchNormNet()
  x = _images(batch=4, size=5)
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  rngs = {'dropout': jax.random.PRNGKey(7)}
  (out, state), taps = ghl_jax.tap(model.apply)(variables, x, train=True,
                                                mutable=['batch_stats'], rngs=rngs)
  expected_out, expected_state = model.apply(variables, x, train=True,
                                             mutable=['batch_stats'], rngs=rngs)
  chex.assert_trees_all_close((out, state), (expected_out, expected_state), rtol=1e-6)
  assert set(state) == {'batch_stats'}
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  np.testing.assert_allclose(taps['conv']['inputs'], (xn - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-4, atol=1e-4)
  head = taps['head']
  dropped = np.asarray(head['inputs']) == 0
  assert 0.3 < dropped.mean() < 0.7
  kernel, bias = variables['params']['head']['kernel'], variables['params']['head']['bias']
  np.testing.assert_allclose(head['outputs'], np.asarray(head['inputs']) @ kernel + bias,
                             rtol=1e-5, atol=1e-5)
  (_, state_from_string), _ = ghl_jax.tap(model.apply)(variables, x, train=True,
                                                       mutable='batch_stats', rngs=rngs)
  chex.assert_trees_all_close(state_from_string, expected_state, rtol=1e-6)


def test_without_mutable_returns_just_the_output(net):
  model, variables, x = net
  for kwargs in ({}, {'mutable': False}):
    out, taps = ghl_jax.tap(model.apply)(variables, x, **kwargs)
    assert isinstance(out, jax.Array)
    chex.assert_trees_all_close(out, model.apply(variables, x), rtol=1e-6)
    assert set(taps) == {'stem', 'block', 'head'}


class SowNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = SowBlock(name='block')(x)
    self.sow('intermediates', 'hidden', h)
    return nn.Dense(2, name='out')(h)


class SowBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(3, name='fc')(x)
    self.sow('intermediates', 'pre', h)
    return nn.relu(h)


@pytest.mark.parametrize('mutable', [['intermediates'], 'intermediates', True])
def test_user_sown_intermediates_are_kept(mutable):
  model = SowNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  variables = model.init(jax.random.PRNGKey(1), x)
  (out, state), taps = ghl_jax.tap(model.apply)(variables, x, mutable=mutable)
  expected = model.apply(variables, x, mutable=mutable)
  chex.assert_trees_all_close((out, state), expected, rtol=1e-6)
  assert set(state['intermediates']) == {'hidden', 'block'}
  assert set(state['intermediates']['block']) == {'pre'}
  assert set(taps) == {'block', 'out'} and set(taps['block']) == {'fc'}


def test_intermediates_not_returned_unless_asked():
  model = SowNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  variables = model.init(jax.random.PRNGKey(1), x)
  out, taps = ghl_jax.tap(model.apply)(variables, x)
  chex.assert_trees_all_close(out, model.apply(variables, x), rtol=1e-6)
  assert set(taps) == {'block', 'out'}


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, name='shared')
    return dense(nn.relu(dense(x)))


def test_weight_shared_module_gives_one_tuple_entry_per_call():
  model = Shared()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
  variables = model.init(jax.random.PRNGKey(1), x)
  out, taps = ghl_jax.tap(model.apply)(variables, x)
  entry = taps['shared']
  assert isinstance(entry['inputs'], tuple) and len(entry['inputs']) == 2
  assert isinstance(entry['outputs'], tuple) and len(entry['outputs']) == 2
  kernel, bias = (np.asarray(variables['params']['shared'][k]) for k in ('kernel', 'bias'))
  first = np.asarray(x) @ kernel + bias
  second = np.maximum(first, 0) @ kernel + bias
  for got, want in zip(entry['inputs'] + entry['outputs'], (x, np.maximum(first, 0), first, second)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, second, rtol=1e-5, atol=1e-6)
