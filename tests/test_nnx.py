"""GHL on flax NNX models equals GHL on the same linen model with the same weights.

The linen path is itself checked against numpy references (test_rules, test_value_and_grad,
test_general_layers); here the same weights are copied into an NNX model and the Hebbian terms and
the whole optimizer update (``nnx.Optimizer`` with ``ghl()``) must agree to rtol 1e-5.
"""
from flax import nnx, traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax

RULE = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65}, layers=r'conv|head')


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME', name='conv1')(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, feature_group_count=2, name='conv2')(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), padding='SAME', rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, padding=1, feature_group_count=2, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Dense(8, name='embed')(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(x)
    x = x + nn.DenseGeneral((2, 4), name='mlp')(x).reshape(x.shape)
    return nn.Dense(3, name='head')(x.mean(axis=1))


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(4, 8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.mlp = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(x)
    x = x + self.mlp(x).reshape(x.shape)
    return self.head(x.mean(axis=1))


def _copy_into(model, linen_params):
  """The NNX model with the linen weights (same paths and shapes)."""
  state = nnx.state(model, nnx.Param)
  flat = {'/'.join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
  source = {'/'.join(k): v for k, v in traverse_util.flatten_dict(linen_params).items()}
  assert sorted(flat) == sorted(source), (sorted(flat), sorted(source))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({tuple(k.split('/')): source[k] for k in flat}))
  nnx.update(model, state)
  return model


CASES = {
    'cnn': (LinenCNN, NnxCNN, (2, 6, 6, 2), RULE),
    'attention_mlp': (LinenBlock, NnxBlock, (2, 5, 4),
                      ghl_jax.Rule('softmax_oja', t_inv=0.5, layers=r'attn/(query|key|value|out)|mlp|head')),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_nnx_ghl_update_equals_linen(case):
  linen_cls, nnx_cls, shape, rule = CASES[case]
  x = jax.random.normal(jax.random.key(0), shape)
  labels = jnp.array([0, 2])
  linen_model = linen_cls()
  params = linen_model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  model = _copy_into(nnx_cls(nnx.Rngs(0)), params)
  np.testing.assert_allclose(model(x), linen_model.apply({'params': params}, x), rtol=1e-5, atol=1e-6)
  make_tx = lambda: optax.chain(ghl_jax.ghl(rule=rule), optax.add_decayed_weights(0.05), optax.sgd(0.1))

  def linen_loss(p):
    logits = linen_model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads, hebb = jax.jit(ghl_jax.value_and_grad(linen_loss, rule))(params)
  tx = make_tx()
  updates, _ = tx.update(grads, tx.init(params), params, hebb=hebb)
  expected = optax.apply_updates(params, updates)

  def nnx_loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads, hebb = ghl_jax.nnx.value_and_grad(nnx_loss, rule)(model)
    optimizer.update(model, grads, hebb=hebb)
    return loss, hebb
  nnx_loss_value, nnx_hebb = step(model, optimizer)
  np.testing.assert_allclose(nnx_loss_value, loss, rtol=1e-5)
  assert sorted(nnx_hebb) == sorted(hebb)
  for path, term in hebb.items():
    np.testing.assert_allclose(nnx_hebb[path].term, term.term, rtol=1e-5, atol=1e-6 * float(jnp.abs(term.term).max()),
                               err_msg=path)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got,
               jax.tree.map(np.asarray, expected))


def test_nnx_convs_run_on_the_gemm_kernels():
  """conv_impl='gemm' (the CPU default) gives what XLA's convolutions give, with convolutions left
  only in the forward pass: ∂x, ∂W and the terms' Σ y ⊗ x are GEMMs, as for linen."""
  model = NnxCNN(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  loss = lambda m: jnp.sum(m(x) ** 2)
  graphdef, state = nnx.split(model)
  results, convolutions = {}, {}
  for impl in ('gemm', 'xla'):
    grad_fn = ghl_jax.nnx.value_and_grad(loss, RULE, conv_impl=impl)
    on_state = lambda s, grad_fn=grad_fn: grad_fn(nnx.merge(graphdef, s))
    value, grads, hebb = jax.jit(on_state)(state)
    results[impl] = (value, nnx.to_pure_dict(grads), {p: h.term for p, h in hebb.items()})
    convolutions[impl] = jax.jit(on_state).lower(state).as_text().count('stablehlo.convolution')
  # Gradients reach |5|: float32 summation order (GEMM vs XLA's convolution) moves small entries by ~1e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), results['gemm'],
               results['xla'])
  assert sorted(results['gemm'][2]) == ['conv1/kernel', 'conv2/kernel', 'head/kernel']
  assert convolutions['gemm'] == 2 < convolutions['xla'], convolutions


class NnxListCNN(nnx.Module):
  def __init__(self, rngs):
    self.convs = nnx.List([nnx.Conv(2, 4, (3, 3), rngs=rngs), nnx.Conv(4, 4, (3, 3), rngs=rngs)])
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(x.mean(axis=(1, 2)))


def test_layers_in_an_nnx_list_get_ghl_updates():
  """Integer keys (``nnx.List`` indices) in the params: ``ghl()`` and the paper's two groups still
  find the kernels; each conv kernel moves by ``sign(G)·|H|/max|H|`` (numpy) times the lr."""
  model = NnxListCNN(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  rule = ghl_jax.Rule('softmax_oja', t_inv=0.5, layers=r'convs')
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loss, grads, hebb = ghl_jax.nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2), rule)(model)
  assert sorted(hebb) == ['convs/0/kernel', 'convs/1/kernel']
  tx = ghl_jax.optim.paper_sgd(lr=0.1, lr_conv=0.01, total_steps=10, wd_conv=0.0, rule=rule,
                               kernels=r'convs/\d+/kernel')
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  optimizer.update(model, grads, hebb=hebb)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  g = nnx.to_pure_dict(grads)
  for i in (0, 1):
    h = np.asarray(hebb[f'convs/{i}/kernel'].term, np.float64)
    step = np.sign(np.asarray(g['convs'][i]['kernel'])) * np.abs(h) / np.abs(h).max()
    np.testing.assert_allclose(before['convs'][i]['kernel'] - after['convs'][i]['kernel'], 0.01 * step,
                               rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(before['head']['kernel'] - after['head']['kernel'], 0.1 * np.asarray(g['head']['kernel']),
                             rtol=1e-4, atol=1e-7)


class NnxResidual(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, x):
    return x + nnx.tanh(self.lin(x))


class NnxScanMLP(nnx.Module):
  """Three residual blocks made by nnx.vmap (kernels stacked (3, 6, 6)) and run by nnx.scan."""

  def __init__(self, rngs):
    self.embed = nnx.Linear(4, 6, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
      return NnxResidual(rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)
    return self.head(body(self.embed(x), self.blocks))


class NnxUnrolledMLP(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(4, 6, rngs=rngs)
    self.block0, self.block1, self.block2 = (NnxResidual(rngs) for _ in range(3))
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block2(self.block1(self.block0(self.embed(x)))))


def test_nnx_scan_stacked_layers_get_one_term_per_block():
  """GHL through nnx.scan equals GHL on the same blocks unrolled (each slice its own layer: its own
  term and its own max-normalisation in ghl())."""
  x = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.array([0, 2, 1, 1, 0])
  stacked = NnxScanMLP(nnx.Rngs(0))
  unrolled = NnxUnrolledMLP(nnx.Rngs(1))
  for name in ('embed', 'head'):
    nnx.update(getattr(unrolled, name), nnx.state(getattr(stacked, name)))
  for i in range(3):
    block = getattr(unrolled, f'block{i}').lin
    block.kernel[...] = stacked.blocks.lin.kernel[...][i]
    block.bias[...] = stacked.blocks.lin.bias[...][i]
  np.testing.assert_allclose(stacked(x), unrolled(x), rtol=1e-5, atol=1e-6)
  rule = ghl_jax.Rule('softmax_oja', t_inv=0.5, layers=r'lin|head')
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

  def train(model):
    optimizer = nnx.Optimizer(model, optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(0.1)), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      value, grads, hebb = ghl_jax.nnx.value_and_grad(loss, rule)(model)
      optimizer.update(model, grads, hebb=hebb)
      return value, hebb
    return step(model, optimizer)
  (loss_s, hebb_s), (loss_u, hebb_u) = train(stacked), train(unrolled)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  assert sorted(hebb_s) == ['blocks/lin/kernel', 'head/kernel'] and hebb_s['blocks/lin/kernel'].stacked == 1
  for i in range(3):
    np.testing.assert_allclose(hebb_s['blocks/lin/kernel'].term[i], hebb_u[f'block{i}/lin/kernel'].term,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stacked.blocks.lin.kernel[...][i], getattr(unrolled, f'block{i}').lin.kernel[...],
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stacked.head.kernel[...], unrolled.head.kernel[...], rtol=1e-5, atol=1e-7)
  assert not hasattr(stacked.blocks.lin, '_ghl_probe')                 # the model is left as it was
  assert sorted(k for k, _ in nnx.to_flat_state(nnx.state(stacked))) == sorted(
      k for k, _ in nnx.to_flat_state(nnx.state(NnxScanMLP(nnx.Rngs(0)))))


def test_nnx_tap_names_the_scan_stacked_calls_it_leaves_out(caplog):
  ghl_jax.nnx._log_unrecorded.cache_clear()               # logged once per process: forget earlier ones
  _, taps = ghl_jax.nnx.tap(lambda m, x: m(x))(NnxScanMLP(nnx.Rngs(0)), jnp.ones((2, 4)))
  assert sorted(taps) == ['embed', 'head']
  assert 'leaves out 1 traced call(s)' in caplog.text and '(Linear)' in caplog.text


def test_nnx_taps_give_the_linen_terms():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  params = LinenCNN().init(jax.random.key(1), x)['params']
  model = _copy_into(NnxCNN(nnx.Rngs(0)), params)
  _, taps = ghl_jax.nnx.tap(lambda m, x: m(x))(model, x)
  assert sorted(taps) == ['conv1', 'conv2', 'head']
  nnx_terms = ghl_jax.hebbian_terms(nnx.to_pure_dict(nnx.state(model, nnx.Param)), taps, rule=RULE)
  _, linen_taps = ghl_jax.tap(LinenCNN().apply)({'params': params}, x)
  linen_terms = ghl_jax.hebbian_terms(params, linen_taps, rule=RULE)
  for path, term in linen_terms.items():
    np.testing.assert_allclose(nnx_terms[path].term, term.term, rtol=1e-5, atol=1e-6)


def test_nnx_errors_are_one_line():
  model = NnxCNN(nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(jnp.ones((1, 4, 4, 2))))
  with pytest.raises(ValueError, match='selects no kernel of the model'):
    ghl_jax.nnx.value_and_grad(loss, ghl_jax.Rule(layers='nothing'))(model)
  with pytest.raises(TypeError, match='ghl_jax.Rule'):
    ghl_jax.nnx.value_and_grad(loss, 'softmax_oja')


def test_readme_nnx_example_trains():
  readme = (__import__('pathlib').Path(__file__).resolve().parents[1] / 'README.md').read_text()
  block = readme[readme.index('## NNX models'):]
  start = block.index('```python') + len('```python')
  namespace = {}
  exec(block[start:block.index('```', start)], namespace)  # pylint: disable=exec-used
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.arange(4)
  losses = [float(namespace['train_step'](namespace['model'], namespace['optimizer'], images, labels))
            for _ in range(3)]
  assert losses[-1] < losses[0]
