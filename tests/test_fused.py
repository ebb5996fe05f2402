"""The fused path (ghl_jax.value_and_grad) and its CPU kernels against plain-numpy references.

The reference builds the patches with the explicit loops of ``numpy_reference.im2col`` and
scatters ``δ Wᵀ`` back by the same loops, in float64; the Hebbian terms come from the
reference rules of ``numpy_reference``. XLA's own convolution is checked alongside.
"""
import itertools
import math

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import ghl_jax
from ghl_jax import accel, fused, kernels, models, optim
from ghl_jax.kernels import host_memory
from ghl_jax.train import steps
from ghl_jax.models.layers import Repeatable, run_repeated
import numpy_reference as ref

# name -> (input shape, kernel shape, strides, padding, kernel dilation, feature groups)
GEOMETRIES = {
    'same': ((2, 6, 5, 3), (3, 3, 3, 5), (1, 1), 'SAME', (1, 1), 1),
    'stride2_same': ((2, 7, 7, 3), (3, 3, 3, 4), (2, 2), 'SAME', (1, 1), 1),
    'stride2_valid_rect': ((2, 7, 6, 3), (3, 2, 3, 4), (2, 1), 'VALID', (1, 1), 1),
    'explicit': ((2, 5, 5, 2), (3, 3, 2, 4), (1, 1), ((2, 0), (1, 2)), (1, 1), 1),
    'dilated': ((2, 7, 7, 2), (3, 3, 2, 4), (1, 1), ((1, 1), (1, 1)), (2, 2), 1),
    'groups': ((2, 5, 5, 4), (3, 3, 2, 6), (1, 1), 'SAME', (1, 1), 2),
    'groups_valid': ((2, 6, 6, 4), (3, 3, 2, 6), (1, 1), 'VALID', (1, 1), 2),
    'conv_1d': ((2, 9, 3), (3, 3, 4), (2,), 'SAME', (1,), 1),
    'pointwise_stride2': ((2, 8, 8, 3), (1, 1, 3, 4), (2, 2), 'VALID', (1, 1), 1),
    'stem_7x7_stride2': ((1, 11, 11, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),
    'deephebb_5x5': ((2, 8, 8, 3), (5, 5, 3, 4), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),
}


def _dimension_numbers(ndim):
  return ('NWC', 'WIO', 'NWC') if ndim == 3 else ('NHWC', 'HWIO', 'NHWC')


def _operands(name, dtype=jnp.float32):
  x_shape, k_shape, *_ = GEOMETRIES[name]
  x = jax.random.normal(jax.random.key(len(name)), x_shape).astype(dtype)
  w = jax.random.normal(jax.random.key(1), k_shape).astype(dtype)
  return x, w


def _conv_kwargs(name):
  x_shape, _, strides, padding, dilation, groups = GEOMETRIES[name]
  return dict(window_strides=strides, padding=padding, rhs_dilation=dilation,
              dimension_numbers=_dimension_numbers(len(x_shape)), feature_group_count=groups)


# ------------------------------------------------------------------------------------------------
# Plain-numpy convolution, its kernel gradient and its input gradient (float64, explicit loops).

def np_patches(x, k_shape, name):
  _, _, strides, padding, dilation, groups = GEOMETRIES[name]
  cols = ref.im2col(x, k_shape[:-2], strides, padding, dilation)     # (B, *out, *taps, C)
  out = cols.shape[:x.ndim - 1]
  taps = math.prod(k_shape[:-2])
  return cols.reshape(math.prod(out), taps, groups, -1), out


def np_conv(x, w, name):
  cols, out = np_patches(np.asarray(x, np.float64), w.shape, name)
  groups = cols.shape[2]
  blocks = np.asarray(w, np.float64).reshape(cols.shape[1], -1, groups, w.shape[-1] // groups)
  return np.einsum('ntgc,tcgf->ngf', cols, blocks).reshape(out + (w.shape[-1],))


def np_conv_grads(x, w, cotangent, name):
  """``(∂x, ∂W)`` of ``Σ cotangent · conv(x, W)``."""
  x_shape, k_shape, strides, padding, dilation, groups = GEOMETRIES[name]
  cols, out = np_patches(np.asarray(x, np.float64), k_shape, name)
  c = np.asarray(cotangent, np.float64).reshape(len(cols), groups, -1)
  blocks = np.asarray(w, np.float64).reshape(cols.shape[1], -1, groups, k_shape[-1] // groups)
  dw = np.einsum('ntgc,ngf->tcgf', cols, c).reshape(k_shape)
  dcols = np.einsum('ngf,tcgf->ntgc', c, blocks).reshape(out + k_shape[:-2] + (x_shape[-1],))
  spatial = k_shape[:-2]
  strides = ref._tuple(strides, len(spatial))
  dilation = ref._tuple(dilation, len(spatial))
  pads = ref.padding_pairs(padding, x_shape[1:-1], spatial, strides, dilation)
  dxp = np.zeros((x_shape[0],) + tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[1:-1], pads))
                 + (x_shape[-1],))
  for pos in itertools.product(*(range(o) for o in out[1:])):
    for off in itertools.product(*(range(k) for k in spatial)):
      index = tuple(p * s + o * d for p, s, o, d in zip(pos, strides, off, dilation))
      dxp[(slice(None),) + index] += dcols[(slice(None),) + pos + off]
  crop = tuple(slice(lo, lo + n) for n, (lo, _) in zip(x_shape[1:-1], pads))
  return dxp[(slice(None),) + crop], dw


def assert_close_to(actual, expected, tol=1e-4):
  """Elementwise closeness on the scale of the expected array."""
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol,
                             atol=tol * max(np.abs(expected).max(), 1e-30))


class GemmConvTest(chex.TestCase):

  @parameterized.named_parameters(*((name, name) for name in GEOMETRIES))
  def test_forward_and_grads_match_numpy_and_xla(self, name):
    x, w = _operands(name)
    kwargs = _conv_kwargs(name)
    self.assertIsNotNone(kernels.conv.geometry_of(x.shape, w.shape, kwargs['window_strides'],
                                               kwargs['padding'], None, kwargs['rhs_dilation'],
                                               kwargs['dimension_numbers'], kwargs['feature_group_count']))
    fast = lambda x, w: kernels.conv.conv_general_dilated(x, w, **kwargs)
    xla = lambda x, w: lax.conv_general_dilated(x, w, precision=lax.Precision.HIGHEST, **kwargs)
    u = jax.jit(fast)(x, w)
    cotangent = jax.random.normal(jax.random.key(7), u.shape)
    dx, dw = jax.jit(lambda x, w, c: jax.vjp(fast, x, w)[1](c))(x, w, cotangent)
    expected_dx, expected_dw = np_conv_grads(x, w, cotangent, name)
    assert_close_to(u, np_conv(x, w, name))
    assert_close_to(dx, expected_dx)
    assert_close_to(dw, expected_dw)
    xla_dx, xla_dw = jax.vjp(xla, x, w)[1](cotangent)
    assert_close_to(dx, xla_dx)
    assert_close_to(dw, xla_dw)

  def test_unpadded_windows_run_forward_as_a_gemm(self):
    """XLA:CPU's convolution is slow on pre-padded (VALID) inputs: those run as ``P W``."""
    for name, convolves in (('stride2_valid_rect', False), ('groups_valid', False),
                            ('pointwise_stride2', True), ('stride2_same', True)):
      x, w = _operands(name)
      kwargs = _conv_kwargs(name)
      hlo = jax.jit(lambda x, w: kernels.conv.conv_general_dilated(x, w, **kwargs)).lower(x, w).as_text()
      self.assertEqual('convolution' in hlo, convolves, name)

  def test_backward_pass_has_no_convolution(self):
    x, w = _operands('stride2_same')
    kwargs = _conv_kwargs('stride2_same')
    grad = jax.grad(lambda x, w: kernels.conv.conv_general_dilated(x, w, **kwargs).sum(), argnums=(0, 1))
    hlo = jax.jit(grad).lower(x, w).as_text()
    self.assertNotIn('convolution', hlo)
    self.assertIn('dot_general', hlo)

  def test_input_dilation_falls_back_to_xla(self):
    x, w = _operands('same')
    kwargs = dict(_conv_kwargs('same'), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2))
    self.assertIsNone(kernels.conv.geometry_of(x.shape, w.shape, kwargs['window_strides'], kwargs['padding'],
                                            (2, 2), None, kwargs['dimension_numbers']))
    fast = lambda x, w: kernels.conv.conv_general_dilated(x, w, **kwargs).sum()
    xla = lambda x, w: lax.conv_general_dilated(x, w, **kwargs).sum()
    chex.assert_trees_all_close(jax.grad(fast, (0, 1))(x, w), jax.grad(xla, (0, 1))(x, w), rtol=1e-5)

  def test_bfloat16_keeps_dtypes_and_values(self):
    x, w = _operands('groups', jnp.bfloat16)
    kwargs = _conv_kwargs('groups')
    fast = lambda x, w: kernels.conv.conv_general_dilated(x, w, **kwargs)
    u, pullback = jax.vjp(fast, x, w)
    cotangent = jax.random.normal(jax.random.key(7), u.shape).astype(jnp.bfloat16)
    dx, dw = pullback(cotangent)
    self.assertEqual((u.dtype, dx.dtype, dw.dtype), (jnp.bfloat16,) * 3)
    expected_dx, expected_dw = np_conv_grads(np.asarray(x, np.float32), np.asarray(w, np.float32),
                                             np.asarray(cotangent, np.float32), 'groups')
    assert_close_to(dx, expected_dx, tol=3e-2)
    assert_close_to(dw, expected_dw, tol=3e-2)


# ------------------------------------------------------------------------------------------------
# The nn.Conv switch and the fused Hebbian terms.

MODULES = {
    'same_bias': (lambda: nn.Conv(5, (3, 3), padding='SAME'), (2, 6, 5, 3)),
    'stride2': (lambda: nn.Conv(4, (3, 3), strides=2, padding=1, use_bias=False), (2, 7, 7, 3)),
    'groups': (lambda: nn.Conv(6, (3, 3), feature_group_count=2, padding='SAME'), (2, 5, 5, 4)),
    'dilated': (lambda: nn.Conv(4, (3, 3), kernel_dilation=2, padding=1, use_bias=False), (2, 7, 7, 2)),
    'conv_1d': (lambda: nn.Conv(4, (3,), strides=2, padding='SAME', use_bias=False), (2, 9, 3)),
}
RULE_CASES = {
    'softmax_oja': ('softmax_oja', {'t_inv': 0.7}),
    'softmax_oja_no_decay': ('softmax_oja', {'t_inv': 1.3, 'decay': False}),
    'softhebb': ('softhebb', {'t_inv': 0.8}),
    'swta_dot': ('swta', {'similarity': 'dot', 't_inv': 2.0}),
    'hpca': ('hpca', {}),
    'hebb': ('hebb', {}),
}


def _module_case(name):
  make, shape = MODULES[name]
  module = make()
  x = jax.random.normal(jax.random.key(len(name)), shape)
  params = module.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  return module, x, params


def _fused_grads(module, x, params, rule, hyper, cotangent, impl='gemm', forward=False):
  """``(kernel grad, raw Hebbian term)`` of ``Σ cotangent · module(x)`` under the fused path."""
  settings = ghl_jax.Rule(rule, t_inv=hyper.pop('t_inv', 1.0), **hyper)
  probed = fused.add_probes(params, ['kernel'], forward=['kernel'] if forward else ())

  def loss(p):
    with fused.use(settings, impl):
      return jnp.sum(module.apply({'params': p}, x) * cotangent)
  grads, terms = fused.pop_probes(jax.jit(jax.grad(loss))(probed))
  return grads['kernel'], terms['kernel']


def _rule_cases():
  """Every rule on two geometries; softmax_oja on all, with both impls and placements."""
  for rule in RULE_CASES:
    for module in ('groups', 'stride2'):
      yield f'{rule}__{module}', rule, module, 'gemm', False
  for module in MODULES:
    for impl, forward in itertools.product(('gemm', 'xla'), (False, True)):
      placement = 'forward' if forward else 'backward'
      yield f'softmax_oja__{module}__{impl}__{placement}', 'softmax_oja', module, impl, forward


class FusedHebbianTest(chex.TestCase):

  @parameterized.named_parameters(*_rule_cases())
  def test_probe_gradient_is_the_numpy_rule(self, rule, module, impl, forward):
    module_, x, params = _module_case(module)
    rule_name, hyper = RULE_CASES[rule]
    _, taps = ghl_jax.tap(module_.apply)({'params': params}, x)
    u = module_.apply({'params': params}, x)
    cotangent = jax.random.normal(jax.random.key(5), u.shape)
    grad, term = _fused_grads(module_, x, params, rule_name, dict(hyper), cotangent, impl, forward)
    sites = ref.Sites(np.asarray(x), np.asarray(params['kernel']), taps['layer'], params.get('bias'))
    assert_close_to(term, ref.RULES[rule_name](sites, **hyper))
    expected_grad = sites.to_kernel(sites.correlate(np.asarray(cotangent, np.float64)))
    assert_close_to(grad, expected_grad)
    self.assertEqual(term.dtype, jnp.float32)

  def test_reflect_padding_matches_the_taps_path(self):
    """REFLECT (SoftHebb's convs): flax pads first, the conv itself is VALID."""
    module = nn.Conv(4, (3, 3), padding='REFLECT', use_bias=False)
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 2))
    params = module.init(jax.random.key(1), x)['params']
    cotangent = jax.random.normal(jax.random.key(5), (2, 6, 6, 4))
    _, term = _fused_grads(module, x, params, 'softmax_oja', {'t_inv': 0.7}, cotangent)
    _, taps = ghl_jax.tap(module.apply)({'params': params}, x)
    expected = ghl_jax.rules.softmax_oja(taps['inputs'], taps['outputs'], params['kernel'], taps['layer'],
                                         t_inv=0.7)
    assert_close_to(term, expected)

  def test_use_swaps_every_conv_for_the_gemm_backward(self):
    module, x, params = _module_case('same_bias')
    loss = lambda p: module.apply({'params': p}, x).sum()
    convs = {}
    for impl in ('gemm', 'xla'):
      with accel.use(impl):
        convs[impl] = str(jax.make_jaxpr(jax.grad(loss))(params)).count('conv_general_dilated[')
    self.assertEqual(convs, {'gemm': 1, 'xla': 2})         # 'gemm': only the forward conv

  def test_conv_with_its_own_convolution_gets_the_vjp_term(self):
    """A conv that brings its own conv_general_dilated keeps it; its term is the rule by the vjp."""
    module = nn.Conv(3, (3, 3), conv_general_dilated=lax.conv_general_dilated)
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
    params = module.init(jax.random.key(0), x)['params']
    cotangent = jax.random.normal(jax.random.key(5), (2, 5, 5, 3))
    _, term = _fused_grads(module, x, params, 'softmax_oja', {'t_inv': 0.7}, cotangent)
    sites = ref.Sites(np.asarray(x), np.asarray(params['kernel']), ghl_jax.tap(module.apply)({'params': params}, x)[1]['layer'],
                      params.get('bias'))
    assert_close_to(term, ref.RULES['softmax_oja'](sites, t_inv=0.7))

  def test_probes_round_trip(self):
    params = {'a': {'kernel': jnp.ones((3, 3, 2, 4)), 'bias': jnp.ones(4)},
              'b': {'kernel': jnp.ones((2, 3, 3, 4, 4))}, 'c': {'kernel': jnp.ones((4, 2))}}
    probed = fused.add_probes(params, ['a/kernel', 'b/kernel'], forward=['b/kernel'])
    self.assertEqual(probed['a'][fused.PROBE].shape, (3, 3, 2, 4))
    self.assertEqual(probed['b'][fused.PROBE_FORWARD].shape, (2, 3, 3, 4, 4))
    rest, terms = fused.pop_probes(probed)
    chex.assert_trees_all_equal(rest, params)
    self.assertEqual(sorted(terms), ['a/kernel', 'b/kernel'])


def test_compute_dtype_auto_follows_the_cpu_flags(tmp_path):
  with_bf16, without = tmp_path / 'bf16', tmp_path / 'plain'
  with_bf16.write_text('flags\t\t: fpu avx512f avx512_bf16 sse\n')
  without.write_text('flags\t\t: fpu avx512f sse\n')
  assert accel.cpu_has_bf16(str(with_bf16)) and not accel.cpu_has_bf16(str(without))
  assert not accel.cpu_has_bf16(str(tmp_path / 'missing'))
  assert accel.compute_dtype('float32') == 'float32' and accel.compute_dtype('bfloat16') == 'bfloat16'
  assert accel.compute_dtype('auto') == ('bfloat16' if accel.cpu_has_bf16() else 'float32')   # CPU backend


def test_resolve():
  assert accel.resolve('auto') == 'gemm'          # tests run on CPU
  assert accel.resolve('xla') == 'xla'
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    accel.resolve('cudnn')


def test_keep_freed_memory_toggles():
  assert host_memory.keep_freed_memory(True)
  assert host_memory.keep_freed_memory(False)


# ------------------------------------------------------------------------------------------------
# Train steps: 'gemm' (fused Hebbian terms) gives the parameters 'xla' (taps + conv vjp) gives.

def _reference_step(model, tx, rule, accum_steps):
  """The taps path, written out: XLA's convolutions, ``jax.value_and_grad`` of the tapped model,
  every Hebbian term from the taps after the gradient (``ghl_jax.hebbian_terms``)."""
  apply = ghl_jax.tap(model.apply)

  def step(state, batch):
    params = state['params']
    rng = jax.random.fold_in(state['rng'], state['step'])
    micro = jax.tree.map(lambda a: a.reshape((accum_steps, -1) + a.shape[1:]), batch)
    batch_stats, grads, hebb = state['batch_stats'], None, None
    for i in range(accum_steps):
      def loss_fn(p):
        (logits, new_state), taps = apply({'params': p, 'batch_stats': batch_stats}, micro['image'][i],
                                          train=True, mutable=['batch_stats'],
                                          rngs={'dropout': jax.random.fold_in(rng, i)})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, micro['label'][i]).mean()
        return loss, (new_state, taps)
      (_, (new_state, taps)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      batch_stats = new_state['batch_stats']
      h = ghl_jax.hebbian_terms(params, taps, rule=rule) if rule is not None else {}
      grads, hebb = (g, h) if i == 0 else (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, hebb, h))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params,
                                   **({'hebb': hebb} if rule is not None else {}))
    new = dict(state, step=state['step'] + 1, params=optax.apply_updates(params, updates),
               batch_stats=batch_stats, opt_state=opt_state)
    return new, {'stats': steps.hebbian_stats(hebb, grads)}
  return step


def _run_steps(model, ghl_kwargs, accum_steps, size, conv_impl=None):
  """One train step of the trainer on ``conv_impl`` (``None``: the taps reference)."""
  batch = {'image': jax.random.normal(jax.random.key(2), (4, size, size, 3)), 'label': jnp.arange(4) % 10}
  variables = model.init(jax.random.key(0), batch['image'][:1], train=False)
  rule, kernels = None, optim.DEFAULT_GHL_KERNELS
  if ghl_kwargs is not None:
    settings = dict(ghl_kwargs)
    rule = ghl_jax.Rule(settings.pop('rule'), **settings)
    kernels = ghl_jax.selection.of_model(rule, model, batch['image'][:1], train=False)   # the GHL group
  tx = optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=10, use_ghl=rule is not None,
                       rule=rule, kernels=kernels)
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(variables['params']),
           'rng': jax.random.key(1)}
  if conv_impl is None:
    step = _reference_step(model, tx, rule, accum_steps)
  else:
    step = steps.make_train_step(model, tx, rule=rule, accum_steps=accum_steps, conv_impl=conv_impl)
  state, metrics = jax.jit(step)(state, batch)
  return state, metrics['stats']


class _Block(Repeatable):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), padding=1, use_bias=False, name='conv')(x))


class ScannedConvs(nn.Module):
  """conv → 2 blocks under nn.scan (stacked kernels, as in the CIFAR ResNets) → classifier."""

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train
    x = nn.Conv(4, (3, 3), strides=2, name='stem')(images)
    x = run_repeated(_Block, 2, x, name='blocks')
    return nn.Dense(10, name='classifier')(x.mean(axis=(1, 2)))


# name -> (model, ghl_kwargs or None for backprop, micro-batches, image side)
STEP_CASES = {
    'deephebb_ghl_accumulated': (lambda: models.DeepHebb(width=0.05),
                                 {'rule': 'softmax_oja',
                                  't_inv': {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}}, 2, 16),
    'deephebb_bp': (lambda: models.DeepHebb(width=0.05), None, 1, 16),
    'deephebb_ghl_dense_too': (lambda: models.DeepHebb(width=0.05),
                               {'rule': 'softmax_oja', 't_inv': 0.5, 'layers': 'conv|classifier'}, 1, 16),
    'scanned_blocks_ghl': (lambda: ScannedConvs(), {'rule': 'hpca'}, 1, 8),
}


@pytest.mark.parametrize('case', sorted(STEP_CASES))
def test_fused_train_step_matches_taps_reference(case):
  """'gemm' and 'xla' with fused Hebbian terms give the parameters of the taps path."""
  make, ghl_kwargs, accum_steps, size = STEP_CASES[case]
  ref_state, ref_metrics = _run_steps(make(), ghl_kwargs, accum_steps, size)
  hebb_keys = sorted(k for k in ref_metrics if k.startswith('hebb/'))
  if ghl_kwargs and 'layers' in ghl_kwargs:
    assert any('classifier' in k for k in hebb_keys)
  impls = ('gemm',) if case == 'deephebb_ghl_dense_too' else ('gemm', 'xla')
  for impl in impls:
    state, metrics = _run_steps(make(), ghl_kwargs, accum_steps, size, conv_impl=impl)
    chex.assert_trees_all_close(state['params'], ref_state['params'], atol=2e-6)
    chex.assert_trees_all_close(state['batch_stats'], ref_state['batch_stats'], rtol=1e-5, atol=1e-6)
    assert hebb_keys == sorted(k for k in metrics if k.startswith('hebb/'))
    for key in hebb_keys:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{impl} {key}')
