"""bfloat16 compute on the CPU kernels: every product accumulates in float32, values match XLA's
float32 products of the same bfloat16 values to bfloat16 accuracy, and GHL's Hebbian terms stay
float32."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghl_jax
from ghl_jax import accel, kernels

BF16 = jnp.bfloat16
# (lhs shape, rhs shape, dimension numbers): Dense, tokens, DenseGeneral over two axes, batched
DOTS = {
    'dense': ((6, 5), (5, 4), (((1,), (0,)), ((), ()))),
    'tokens': ((2, 3, 5), (5, 4), (((2,), (0,)), ((), ()))),
    'two_axes': ((2, 3, 4, 5), (4, 5, 6), (((2, 3), (0, 1)), ((), ()))),
    'batched_heads': ((3, 2, 4, 5), (3, 5, 2, 6), (((3,), (1,)), ((0,), (0,)))),
}


def _bf16(key, shape):
  return jax.random.normal(jax.random.key(key), shape).astype(BF16)


def _close(actual, expected, tol=2e-2):
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol,
                             atol=tol * np.abs(expected).max())


def _dots(fn, *args) -> list:
  """``(operand dtype, preferred_element_type)`` of every ``dot_general`` in ``fn``'s jaxpr,
  sub-jaxprs (custom_vjp, pjit, scan) included."""
  found = []

  def walk(jaxpr):
    jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append((str(eqn.invars[0].aval.dtype), str(eqn.params['preferred_element_type'])))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args))
  return found


def _low_precision_accumulation(fn, *args) -> set:
  """The accumulation types of ``fn``'s bfloat16 products."""
  return {pet for dtype, pet in _dots(fn, *args) if dtype == 'bfloat16'}


@pytest.mark.parametrize('name', sorted(DOTS))
def test_dot_general_matches_float64_in_both_passes(name):
  a_shape, b_shape, dims = DOTS[name]
  a, b = _bf16(1, a_shape), _bf16(2, b_shape)
  out, pullback = jax.vjp(lambda a, b: kernels.matmul.dot_general(a, b, dims), a, b)
  g = _bf16(3, out.shape)
  da, db = pullback(g)
  assert (out.dtype, da.dtype, db.dtype) == (BF16,) * 3
  # XLA's own product and its transpose, float32 at full precision, on the same bf16 values
  reference = lambda a, b: jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST)
  out32, pull32 = jax.vjp(reference, a.astype(jnp.float32), b.astype(jnp.float32))
  da32, db32 = pull32(g.astype(jnp.float32))
  _close(out, out32)
  _close(da, da32)
  _close(db, db32)
  grad = jax.grad(lambda a, b: kernels.matmul.dot_general(a, b, dims).astype(jnp.float32).sum(), (0, 1))
  assert _low_precision_accumulation(grad, a, b) == {'float32'}


def test_dot_general_leaves_float32_and_explicit_types_alone():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 2))
  dims = (((1,), (0,)), ((), ()))
  assert _dots(lambda a, b: kernels.matmul.dot_general(a, b, dims), a, b) == [('float32', 'None')]
  typed = lambda a, b: kernels.matmul.dot_general(a.astype(BF16), b.astype(BF16), dims,
                                                  preferred_element_type=BF16)
  assert typed(a, b).dtype == BF16


# (strides, padding, kernel dilation, feature groups): the per-tap input gradient and the
# channel-major patches of the bf16 weight product must cover each
CONVS = {
    'same': ((1, 1), 'SAME', (1, 1), 1),
    'strided_asymmetric': ((2, 1), ((1, 0), (2, 1)), (1, 1), 1),
    'dilated_valid': ((1, 1), 'VALID', (2, 1), 1),
    'grouped': ((1, 2), 'SAME', (1, 1), 3),
}


@pytest.mark.parametrize('name', sorted(CONVS))
def test_bfloat16_conv_runs_as_gemms_accumulating_in_float32(name):
  strides, padding, dilation, groups = CONVS[name]
  x, w = _bf16(1, (2, 7, 6, 3 * groups)), _bf16(2, (3, 2, 3, 4 * groups))
  kwargs = dict(rhs_dilation=dilation, feature_group_count=groups,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  cotangent = _bf16(3, jax.eval_shape(lambda: jax.lax.conv_general_dilated(
      x, w, strides, padding, **kwargs)).shape)
  conv = lambda x, w: (kernels.conv.conv_general_dilated(x, w, strides, padding, **kwargs)
                       .astype(jnp.float32) * cotangent).sum()
  grad = jax.grad(conv, (0, 1))
  text = str(jax.make_jaxpr(grad)(x, w))
  assert 'conv_general_dilated' not in text       # forward too: P·W (XLA:CPU's bf16 conv is slow)
  assert _low_precision_accumulation(grad, x, w) == {'float32'}
  reference = jax.grad(lambda x, w: (jax.lax.conv_general_dilated(x, w, strides, padding, **kwargs)
                                     * cotangent.astype(jnp.float32)).sum(), (0, 1))
  for got, want in zip(grad(x, w), reference(x.astype(jnp.float32), w.astype(jnp.float32))):
    assert got.dtype == BF16
    _close(got, want)


class _Net(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), dtype=self.dtype, name='conv')(x))
    x = nn.DenseGeneral(5, axis=(-2, -1), dtype=self.dtype, name='mix')(x.reshape(x.shape[0], 6, -1))
    return nn.Dense(3, dtype=self.dtype, name='head')(x.reshape(x.shape[0], -1))


def test_ghl_in_bfloat16_keeps_float32_terms_close_to_float32():
  """The same params in bf16 and f32 compute: gradients and raw Hebbian terms agree to bf16
  accuracy; the terms are float32 and every product of the bf16 step accumulates in float32.
  (The float32 step itself is checked against numpy in test_value_and_grad.)"""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  labels = jnp.arange(4) % 3
  params = _Net().init(jax.random.key(1), x)['params']
  rule = ghl_jax.Rule('softmax_oja', t_inv=0.5, layers=r'conv|mix|head')
  results = {}
  for dtype in (jnp.float32, BF16):
    model = _Net(dtype)

    def loss(p, model=model):
      logits = model.apply({'params': p}, x).astype(jnp.float32)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    step = jax.jit(ghl_jax.value_and_grad(loss, rule, conv_impl='gemm'))
    results[dtype] = step(params)
    if dtype == BF16:
      assert _low_precision_accumulation(ghl_jax.value_and_grad(loss, rule, conv_impl='gemm'), params) == {'float32'}
  (_, g32, h32), (_, g16, h16) = results[jnp.float32], results[BF16]
  assert sorted(h16) == ['conv/kernel', 'head/kernel', 'mix/kernel']
  for path in h16:
    assert h16[path].term.dtype == jnp.float32
    _close(h16[path].term, h32[path].term, tol=3e-2)
  chex.assert_trees_all_equal_dtypes(g16, g32)
  for got, want in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    _close(got, want, tol=5e-2)


def test_dense_hook_only_on_gemm_impl():
  model = nn.Dense(3, dtype=BF16)
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)
  for impl, expected in (('gemm', {'float32'}), ('xla', {'None'})):
    with accel.use(impl):
      assert _low_precision_accumulation(lambda p: model.apply(p, x), params) == expected
