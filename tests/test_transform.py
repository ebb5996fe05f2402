"""ghl(): ``G ← sign(G) ⊙ |Ĥ|`` for selected kernels, against a numpy Ĥ (im2col reference).

The model is BN-free, so half-batches give exactly the terms of the full batch.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
import numpy_reference as ref


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME', use_bias=False, name='conv1')(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, name='conv2')(x))
    return nn.Dense(3, name='classifier')(x.reshape(x.shape[0], -1))


def _loss(apply_fn, variables, x, labels):
  logits, taps = ghl_jax.tap(apply_fn)(variables, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), taps


def grads_and_taps(model, params, x, labels):
  loss = lambda p: _loss(model.apply, {'params': p}, x, labels)
  return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.fixture(scope='module')
def setup():
  model = ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 3))
  labels = jnp.array([0, 1, 2, 1])
  params = model.init(jax.random.PRNGKey(1), x)['params']
  grads, taps = grads_and_taps(model, params, x, labels)
  return model, params, x, labels, grads, taps


def raw_term(params, taps, module, t_inv=1.0, rule='softmax_oja', **hyper):
  """Numpy H of one tapped module (t_inv only for rules that take it)."""
  if rule in ('softmax_oja', 'softhebb', 'swta'):
    hyper['t_inv'] = t_inv
  sites = ref.Sites(np.asarray(taps[module]['inputs']), params[module]['kernel'],
                    taps[module]['layer'], params[module].get('bias'))
  return ref.RULES[rule](sites, **hyper)


def expected_update(params, grads, taps, module, t_inv=1.0):
  return ref.ghl_update(grads[module]['kernel'], raw_term(params, taps, module, t_inv))


def assert_untouched(updates, grads, paths):
  """Bit-for-bit equality of the listed leaves."""
  for module, name in paths:
    np.testing.assert_array_equal(updates[module][name], grads[module][name],
                                  err_msg=f'{module}/{name}')


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5, atol=1e-6)


class GHLTest(chex.TestCase):

  @pytest.fixture(autouse=True)
  def _setup(self, setup):
    self.setup = setup

  @chex.variants(with_jit=True, without_jit=True)
  def test_default_selection_updates_conv_kernels_only(self):
    model, params, x, labels, grads, taps = self.setup
    tx = ghl_jax.ghl(rule=ghl_jax.Rule(t_inv=0.7))
    update = self.variant(lambda g, s, p, t: tx.update(g, s, p, taps=t)[0])
    updates = update(grads, tx.init(params), params, taps)
    for module in ('conv1', 'conv2'):
      assert_close(updates[module]['kernel'],
                   expected_update(params, grads, taps, module, t_inv=0.7))
    assert_untouched(updates, grads, [('conv2', 'bias'), ('classifier', 'kernel'),
                                      ('classifier', 'bias')])


def test_default_selection_is_conv_kernels(setup):
  _, params, _, _, _, taps = setup
  assert set(ghl_jax.selected_layers(taps)) == {'conv1/kernel', 'conv2/kernel'}
  assert set(ghl_jax.hebbian_terms(params, taps)) == {'conv1/kernel', 'conv2/kernel'}


def test_hebbian_terms_are_raw_numpy_terms(setup):
  _, params, _, _, _, taps = setup
  terms = ghl_jax.hebbian_terms(params, taps, t_inv={'conv1': 0.3, 'conv2': 1.5})
  for module, t_inv in (('conv1', 0.3), ('conv2', 1.5)):
    term = terms[f'{module}/kernel']
    assert term.stacked == 0 and term.term.dtype == jnp.float32
    expected = raw_term(params, taps, module, t_inv)
    np.testing.assert_allclose(term.term, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize('layers, governed', [
    ('classifier', ['classifier']),
    (r'conv2', ['conv2']),
    (r'^conv\d/kernel$|classifier', ['conv1', 'conv2', 'classifier']),
    (['conv2/kernel', 'classifier/kernel'], ['conv2', 'classifier']),
    (('conv1/kernel',), ['conv1']),
])
def test_layers_regex_and_exact_paths(setup, layers, governed):
  _, params, _, _, grads, taps = setup
  tx = ghl_jax.ghl(rule=ghl_jax.Rule(layers=layers))
  updates, _ = tx.update(grads, tx.init(params), params, taps=taps)
  for module in ('conv1', 'conv2', 'classifier'):
    if module in governed:
      assert_close(updates[module]['kernel'], expected_update(params, grads, taps, module))
    else:
      assert_untouched(updates, grads, [(module, 'kernel')])
  assert_untouched(updates, grads, [('conv2', 'bias'), ('classifier', 'bias')])


@pytest.mark.parametrize('layers', ['no_such_layer', ['conv1/bias'], ['conv1']])
def test_selection_of_nothing_raises(setup, layers):
  _, params, _, _, grads, taps = setup
  tx = ghl_jax.ghl(rule=ghl_jax.Rule(layers=layers))
  with pytest.raises(ValueError, match='selects no kernel'):
    tx.update(grads, tx.init(params), params, taps=taps)


@pytest.mark.parametrize('t_inv, per_layer', [
    ({'conv1': 0.5, 'conv2': 2.0}, {'conv1': 0.5, 'conv2': 2.0}),
    ({'conv1': 0.5}, {'conv1': 0.5, 'conv2': 1.0}),
    ({'conv2/kernel': 3.0, r'conv\d': 0.25}, {'conv1': 0.25, 'conv2': 3.0}),
    (0.4, {'conv1': 0.4, 'conv2': 0.4}),
])
def test_t_inv_per_layer(setup, t_inv, per_layer):
  _, params, _, _, grads, taps = setup
  tx = ghl_jax.ghl(rule=ghl_jax.Rule(t_inv=t_inv))
  updates, _ = tx.update(grads, tx.init(params), params, taps=taps)
  for module, value in per_layer.items():
    assert_close(updates[module]['kernel'], expected_update(params, grads, taps, module, value))


@pytest.mark.parametrize('direction, magnitude, formula', [
    ('hebbian', 'hebbian', lambda g, h_hat: -h_hat),
    ('gradient', 'unit', lambda g, h_hat: np.sign(g)),
    ('gradient', 'gradient', lambda g, h_hat: g),
    ('hebbian', 'unit', lambda g, h_hat: -np.sign(h_hat)),
])
def test_ablations(setup, direction, magnitude, formula):
  _, params, _, _, grads, taps = setup
  tx = ghl_jax.ghl(direction=direction, magnitude=magnitude)
  updates, _ = tx.update(grads, tx.init(params), params, taps=taps)
  for module in ('conv1', 'conv2'):
    h_hat = ref.max_normalize(raw_term(params, taps, module))
    expected = formula(np.asarray(grads[module]['kernel'], np.float64), h_hat)
    assert_close(updates[module]['kernel'], expected)
  assert_untouched(updates, grads, [('classifier', 'kernel')])


def test_other_rules_through_ghl(setup):
  _, params, _, _, grads, taps = setup
  for rule, hyper in (('hpca', {}), ('swta', {'similarity': 'dot'}), ('softmax_oja', {'decay': False})):
    tx = ghl_jax.ghl(rule=ghl_jax.Rule(rule, t_inv=1.0 if rule == 'hpca' else 0.5, **hyper))   # hpca: none
    updates, _ = tx.update(grads, tx.init(params), params, taps=taps)
    for module in ('conv1', 'conv2'):
      h = raw_term(params, taps, module, 0.5, rule, **hyper)
      assert_close(updates[module]['kernel'], ref.ghl_update(grads[module]['kernel'], h))


class ConvBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(3, (3, 3), padding='SAME', use_bias=False, name='conv')(x)), None


class ScanNet(nn.Module):
  """A 1×1 conv, three scanned 3×3 conv blocks (stacked kernels), a Dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (1, 1), name='conv_in')(x)
    blocks = nn.scan(ConvBlock, variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True}, length=3)
    x, _ = blocks(name='blocks')(x, None)
    return nn.Dense(2, name='classifier')(x.mean((1, 2)))


def test_stacked_scan_kernels_are_normalised_per_block():
  model = ScanNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
  params = model.init(jax.random.PRNGKey(1), x)['params']
  # Different scales per block, so that one max over all blocks would be wrong.
  kernel = params['blocks']['conv']['kernel'] * jnp.array([1.0, 4.0, 0.25])[:, None, None, None, None]
  params = {**params, 'blocks': {'conv': {'kernel': kernel}}}
  grads, taps = grads_and_taps(model, params, x, jnp.array([0, 1]))
  entry = taps['blocks']['conv']
  assert entry['inputs'].shape == (3, 2, 5, 5, 3)
  terms = ghl_jax.hebbian_terms(params, taps)
  assert terms['blocks/conv/kernel'].stacked == 1
  tx = ghl_jax.ghl()
  updates, _ = jax.jit(lambda g, p, t: tx.update(g, tx.init(p), p, taps=t))(grads, params, taps)
  for block in range(3):
    sites = ref.Sites(np.asarray(entry['inputs'][block]), kernel[block], entry['layer'])
    expected = ref.ghl_update(grads['blocks']['conv']['kernel'][block], ref.softmax_oja(sites))
    assert_close(updates['blocks']['conv']['kernel'][block], expected)
  sites = ref.Sites(np.asarray(taps['conv_in']['inputs']), params['conv_in']['kernel'],
                    taps['conv_in']['layer'], params['conv_in']['bias'])
  assert_close(updates['conv_in']['kernel'],
               ref.ghl_update(grads['conv_in']['kernel'], ref.softmax_oja(sites)))
  assert_untouched(updates, grads, [('classifier', 'kernel'), ('conv_in', 'bias')])


def test_chain_with_sgd(setup):
  _, params, _, _, grads, taps = setup
  tx = optax.chain(ghl_jax.ghl(rule=ghl_jax.Rule(t_inv=0.5)), optax.sgd(0.1))
  updates, _ = jax.jit(lambda g, p, t: tx.update(g, tx.init(p), p, taps=t))(grads, params, taps)
  for module in ('conv1', 'conv2'):
    assert_close(updates[module]['kernel'], -0.1 * expected_update(params, grads, taps, module, 0.5))
  assert_close(updates['classifier']['kernel'], -0.1 * np.asarray(grads['classifier']['kernel']))


def test_inject_hyperparams_with_learning_rate(setup):
  _, params, _, _, grads, taps = setup
  make = lambda learning_rate: optax.chain(ghl_jax.ghl(rule=ghl_jax.Rule(t_inv=0.5)), optax.sgd(learning_rate))
  tx = optax.inject_hyperparams(make)(learning_rate=0.3)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, taps=taps)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.3)
  for module in ('conv1', 'conv2'):
    assert_close(updates[module]['kernel'], -0.3 * expected_update(params, grads, taps, module, 0.5))
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  updates, _ = tx.update(grads, state, params, taps=taps)
  assert_close(updates['conv1']['kernel'], -0.05 * expected_update(params, grads, taps, 'conv1', 0.5))


def test_multi_transform_masked_leaves_pass_through(setup):
  """ghl in the 'ghl' group selects the classifier too; there it is a MaskedNode and is skipped."""
  _, params, _, _, grads, taps = setup
  labels = {'conv1': {'kernel': 'ghl'}, 'conv2': {'kernel': 'ghl', 'bias': 'ghl'},
            'classifier': {'kernel': 'bp', 'bias': 'bp'}}
  tx = optax.multi_transform(
      {'ghl': optax.chain(ghl_jax.ghl(rule=ghl_jax.Rule(layers='conv|classifier')), optax.sgd(0.1)),
       'bp': optax.sgd(0.2)},
      labels, mask_compatible_extra_args=True)
  updates, _ = jax.jit(lambda g, p, t: tx.update(g, tx.init(p), p, taps=t))(grads, params, taps)
  for module in ('conv1', 'conv2'):
    assert_close(updates[module]['kernel'], -0.1 * expected_update(params, grads, taps, module))
  assert_close(updates['conv2']['bias'], -0.1 * np.asarray(grads['conv2']['bias']))
  assert_close(updates['classifier']['kernel'], -0.2 * np.asarray(grads['classifier']['kernel']))
  assert_close(updates['classifier']['bias'], -0.2 * np.asarray(grads['classifier']['bias']))


def test_precomputed_hebb_equals_taps(setup):
  _, params, _, _, grads, taps = setup
  tx = ghl_jax.ghl(rule=ghl_jax.Rule(t_inv={'conv1': 0.5}))
  from_taps, _ = tx.update(grads, tx.init(params), params, taps=taps)
  hebb = ghl_jax.hebbian_terms(params, taps, t_inv={'conv1': 0.5})
  from_hebb, _ = tx.update(grads, tx.init(params), params, hebb=hebb)
  chex.assert_trees_all_equal(from_hebb, from_taps)


def test_half_batch_terms_add_up_to_the_full_batch(setup):
  model, params, x, labels, grads, taps = setup
  halves = [grads_and_taps(model, params, x[s], labels[s])[1] for s in (slice(0, 2), slice(2, 4))]
  summed = jax.tree.map(jnp.add, *(ghl_jax.hebbian_terms(params, t) for t in halves))
  full = ghl_jax.hebbian_terms(params, taps)
  chex.assert_trees_all_close(summed, full, rtol=1e-5, atol=1e-5)
  tx = ghl_jax.ghl()
  accumulated, _ = tx.update(grads, tx.init(params), params, hebb=summed)
  for module in ('conv1', 'conv2'):
    assert_close(accumulated[module]['kernel'], expected_update(params, grads, taps, module))


class SharedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(3, (3, 3), padding='SAME', use_bias=False, name='conv')
    return conv(nn.relu(conv(x))).mean((1, 2, 3))


def test_weight_shared_layer_sums_its_calls():
  model = SharedNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  params = model.init(jax.random.PRNGKey(1), x)['params']
  _, taps = ghl_jax.tap(model.apply)({'params': params}, x)
  kernel = params['conv']['kernel']
  expected = sum(ref.softmax_oja(ref.Sites(np.asarray(xi), kernel, taps['conv']['layer']))
                 for xi in taps['conv']['inputs'])
  term = ghl_jax.hebbian_terms(params, taps)['conv/kernel'].term
  np.testing.assert_allclose(term, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_bad_arguments_raise(setup):
  _, params, _, _, grads, taps = setup
  for make, match in ((lambda: ghl_jax.ghl(direction='up'), 'direction'),
                      (lambda: ghl_jax.ghl(magnitude='big'), 'magnitude'),
                      (lambda: ghl_jax.Rule(t_inv=0.0), 't_inv'),
                      (lambda: ghl_jax.Rule(t_inv={'conv1': -1.0}), 'conv1'),
                      (lambda: ghl_jax.Rule('nope'), 'Unknown Hebbian rule')):
    with pytest.raises(ValueError, match=match):
      make()
  tx = ghl_jax.ghl()
  with pytest.raises(ValueError, match='taps'):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match='params'):
    tx.update(grads, tx.init(params), taps=taps)
