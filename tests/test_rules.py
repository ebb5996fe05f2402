"""Every local rule against the plain-numpy im2col reference, on tapped Dense and Conv layers.

The layer geometry (and its inputs/outputs) comes from tapping a real flax module, so the
tests exercise the path ``ghl()`` uses: ``rule(taps['inputs'], taps['outputs'], kernel, layer)``.
"""
import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghl_jax
from ghl_jax import rules
import numpy_reference as ref

# name -> (module, input shape). Tiny shapes; every padding/stride/dilation/group variant.
GEOMETRIES = {
    'dense_2d': (lambda: nn.Dense(5, bias_init=nn.initializers.constant(0.5)), (8, 4)),
    'dense_3d': (lambda: nn.Dense(5, bias_init=nn.initializers.constant(0.5)), (2, 3, 4)),
    'conv_same': (lambda: nn.Conv(5, (3, 3), padding='SAME', use_bias=False), (2, 6, 5, 3)),
    'conv_stride2_same': (lambda: nn.Conv(5, (3, 3), strides=2, padding='SAME'), (2, 6, 7, 3)),
    'conv_stride2_valid': (lambda: nn.Conv(4, (3, 2), strides=(2, 1), padding='VALID',
                                           use_bias=False), (2, 7, 6, 3)),
    'conv_explicit': (lambda: nn.Conv(4, (3, 3), padding=((2, 0), (1, 2)), use_bias=False),
                      (2, 5, 5, 2)),
    'conv_dilated': (lambda: nn.Conv(4, (3, 3), kernel_dilation=2, padding=1, use_bias=False),
                     (2, 7, 7, 2)),
    'conv_groups': (lambda: nn.Conv(6, (3, 3), feature_group_count=2, padding='SAME'),
                    (2, 5, 5, 4)),
    'conv_1d': (lambda: nn.Conv(4, (3,), strides=2, padding='SAME', use_bias=False), (2, 9, 3)),
}

# name -> (rule name, hyper-parameters)
RULE_CASES = {
    'softmax_oja': ('softmax_oja', {'t_inv': 0.7}),
    'softmax_oja_no_competition': ('softmax_oja', {'competition': False}),
    'softmax_oja_no_decay': ('softmax_oja', {'t_inv': 1.3, 'decay': False}),
    'softhebb': ('softhebb', {'t_inv': 0.8}),
    'swta_cosine': ('swta', {'similarity': 'cosine'}),
    'swta_dot': ('swta', {'similarity': 'dot', 't_inv': 2.0}),
    'hpca': ('hpca', {}),
    'oja': ('oja', {}),
    'hebb': ('hebb', {}),
}


@functools.lru_cache(maxsize=None)
def tapped(geometry: str, dtype=jnp.float32):
  """``(x, u, params, layer)`` of one call of the geometry's module, read from its taps."""
  make, shape = GEOMETRIES[geometry]
  module = make().clone(dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(len(geometry)), shape).astype(dtype)
  variables = module.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        variables['params'])
  _, taps = ghl_jax.tap(module.apply)({'params': params}, x)
  return taps['inputs'], taps['outputs'], params, taps['layer']


def reference(geometry: str, rule: str, **hyper):
  x, _, params, layer = tapped(geometry)
  sites = ref.Sites(np.asarray(x), np.asarray(params['kernel']), layer, params.get('bias'))
  return ref.RULES[rule](sites, **hyper)


def assert_close_to(actual, expected, tol=1e-4):
  """Elementwise closeness on the scale of the term (``atol = tol · max|H|``)."""
  chex.assert_trees_all_close(np.asarray(actual, np.float64), expected, rtol=tol,
                              atol=tol * np.abs(expected).max())


def _cases():
  for geometry in GEOMETRIES:
    for case, (rule, hyper) in RULE_CASES.items():
      yield dict(testcase_name=f'{case}__{geometry}', rule=rule, hyper=hyper, geometry=geometry)


class RulesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_cases())
  def test_matches_numpy_im2col(self, rule, hyper, geometry):
    x, u, params, layer = tapped(geometry)
    fn = self.variant(functools.partial(rules.get(rule), layer=layer, **hyper))
    h = fn(x, u, params['kernel'])
    self.assertEqual(h.dtype, jnp.float32)
    self.assertEqual(h.shape, params['kernel'].shape)
    assert_close_to(h, reference(geometry, rule, **hyper))

  @parameterized.named_parameters(
      ('softmax_oja', 'softmax_oja', {}),
      ('softmax_oja_no_competition', 'softmax_oja', {'competition': False}),
      ('swta_dot', 'swta', {'similarity': 'dot', 't_inv': 2.0}),
      ('hpca', 'hpca', {}),
      ('oja', 'oja', {}),
      ('hebb', 'hebb', {}),
  )
  def test_bfloat16_module_gives_float32_terms(self, rule, hyper):
    """A bfloat16 layer's taps give float32 terms close to the float32 reference (after Ĥ)."""
    for geometry in ('dense_3d', 'conv_stride2_same', 'conv_groups'):
      x, u, params, layer = tapped(geometry, jnp.bfloat16)
      self.assertEqual((x.dtype, u.dtype), (jnp.bfloat16, jnp.bfloat16))
      h = jax.jit(functools.partial(rules.get(rule), layer=layer, **hyper))(x, u, params['kernel'])
      self.assertEqual(h.dtype, jnp.float32)
      sites = ref.Sites(np.asarray(x, np.float32), np.asarray(params['kernel']), layer,
                        params.get('bias'))
      expected = ref.max_normalize(ref.RULES[rule](sites, **hyper))
      chex.assert_trees_all_close(np.asarray(rules.max_normalize(h)), expected, atol=3e-2)


class MaxNormalizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_largest_element_is_one(self):
    h = np.array([[0.5, -4.0], [2.0, 1.0]], np.float32)
    out = self.variant(rules.max_normalize)(h)
    chex.assert_trees_all_close(out, h / 4.0)

  def test_zero_term_stays_finite(self):
    out = rules.max_normalize(jnp.zeros((2, 3)))
    chex.assert_trees_all_equal(out, jnp.zeros((2, 3)))


def test_unknown_rule_raises():
  with pytest.raises(ValueError, match='Unknown Hebbian rule'):
    rules.get('no_such_rule')


def test_unknown_swta_similarity_raises():
  x, u, params, layer = tapped('dense_2d')
  with pytest.raises(ValueError, match='similarity'):
    rules.swta(x, u, params['kernel'], layer, similarity='euclid')


def test_reference_im2col_matches_tapped_outputs():
  """Sanity of the reference itself: its ``u`` equals what the flax layer computed."""
  for geometry in GEOMETRIES:
    x, u, params, layer = tapped(geometry)
    sites = ref.Sites(np.asarray(x), np.asarray(params['kernel']), layer, params.get('bias'))
    np.testing.assert_allclose(sites.outputs(), np.asarray(u), rtol=1e-5, atol=1e-5,
                               err_msg=geometry)
