"""``ghl_jax.Rule``: validation, per-layer settings, selection, and one object read everywhere."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ghl_jax
from ghl_jax import rules
from ghl_jax.tap import Layer
import flax.linen as nn


def test_frozen_hashable_and_static_under_jit():
  rule = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25}, decay=False)
  assert hash(rule) == hash(ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25}, decay=False))
  with pytest.raises(AttributeError):
    rule.name = 'hebb'
  assert jax.tree.leaves(rule) == []
  calls = []

  @jax.jit
  def f(x, r):
    calls.append(r)
    return x * r.t_inv_for('conv2/kernel')
  np.testing.assert_allclose(f(jnp.ones(()), rule), 0.65)
  f(jnp.ones(()), ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25}, decay=False))
  assert len(calls) == 1                        # an equal rule reuses the compiled function
  assert repr(rule) == "Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25}, decay=False)"


def test_per_layer_t_inv_and_selection():
  rule = ghl_jax.Rule(t_inv={'conv2': 0.65, r'blocks/.*': 0.3}, layers=r'conv|blocks')
  assert rule.t_inv_for('conv2/kernel') == 0.65
  assert rule.t_inv_for('stage/blocks/conv/kernel') == 0.3
  assert rule.t_inv_for('conv1/kernel') == 1.0
  assert rule.selects('conv1/kernel', is_conv=True) and not rule.selects('head/kernel', is_conv=False)
  assert ghl_jax.Rule().selects('anything/kernel', is_conv=True)
  assert not ghl_jax.Rule().selects('dense/kernel', is_conv=False)
  exact = ghl_jax.Rule(layers=['conv1/kernel'])
  assert exact.layers == ('conv1/kernel',) and not exact.selects('conv10/kernel', is_conv=True)
  assert rule.replace(layers=None).layers is None and rule.replace(layers=None).t_inv == rule.t_inv
  assert rule.replace(name='softhebb').name == 'softhebb'


def test_term_binds_the_rule_settings():
  module = nn.Conv(3, (3, 3), padding='SAME', use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  params = module.init(jax.random.key(1), x)['params']
  u = module.apply({'params': params}, x)
  layer = Layer.of(module.bind({'params': params}))
  rule = ghl_jax.Rule('softmax_oja', t_inv={'conv': 0.4}, decay=False)
  expected = rules.softmax_oja(x, u, params['kernel'], layer, t_inv=0.4, decay=False)
  np.testing.assert_allclose(rule.term('conv/kernel')(x, u, params['kernel'], layer), expected, rtol=1e-6)


@pytest.mark.parametrize('kwargs, match', [
    ({'name': 'nope'}, 'Unknown Hebbian rule'),
    ({'t_inv': 0.0}, 't_inv must be a number > 0'),
    ({'t_inv': {'conv1': -1.0}}, "for 'conv1'"),
    ({'t_inv': 'warm'}, 't_inv must be a number'),
    ({'name': 'hpca', 't_inv': 0.5}, 'has no temperature'),
    ({'competiton': False}, r"takes no \['competiton'\]; its settings are \['competition', 'decay'\]"),
    ({'layers': '(unclosed'}, 'not a valid regex'),
    ({'layers': 3}, 'layers must be None, a regex or a collection'),
    ({'decay': [1]}, 'plain values'),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
  kwargs = dict(kwargs)
  name = kwargs.pop('name', 'softmax_oja')
  with pytest.raises(ValueError, match=match) as error:
    ghl_jax.Rule(name, **kwargs)
  assert '\n' not in str(error.value)


def test_v1_keywords_and_rule_object_agree():
  rule = ghl_jax.Rule.of('softmax_oja', t_inv=0.5, layers='conv', rule_kwargs={'decay': False})
  assert rule == ghl_jax.Rule('softmax_oja', t_inv=0.5, layers='conv', decay=False)
  assert ghl_jax.Rule.of(rule) is rule
  assert ghl_jax.Rule.of('hpca', t_inv=0.5) == ghl_jax.Rule('hpca')      # v1 ignored it: still does
  with pytest.raises(ValueError, match='put them in the Rule'):
    ghl_jax.ghl(0.5, rule=rule)
  with pytest.raises(ValueError, match='put them in the Rule'):
    ghl_jax.hebbian.hebbian_ascent(0.1, rule=rule, layers='conv')


def test_every_registered_rule_builds():
  for name in rules.RULES:
    assert ghl_jax.Rule(name).fn is rules.RULES[name]
