"""One GHL step of DeepHebb on 8 simulated devices equals the single-device step on the global batch.

* ``jax.jit`` over a ``Mesh`` (batch sharded with ``P('data')``, params replicated), in
  training mode: XLA computes the global BatchNorm statistics and the global Hebbian sums.
* ``jax.shard_map`` and ``jax.pmap``: each device computes its own loss mean and taps; grads
  are ``pmean``-ed and ``ghl(axis_name='data')`` psums the raw Hebbian terms. BatchNorm batch
  statistics would differ per device there, so these two run DeepHebb with BN in eval mode
  (``train=False``: running averages) and ``dropout_rate=0``, where the per-device
  computation is exactly a slice of the global one. Under ``shard_map``'s default
  ``check_vma=True`` the gradient of a replicated input is already summed over devices, so the
  step first makes params per-device (``jax.lax.pcast(params, 'data', to='varying')``); only
  then is ``pmean`` the global mean.
"""
import functools

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import models, optim

DEVICES = 8
GLOBAL_BATCH = 16
T_INV = {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}

pytestmark = pytest.mark.skipif(jax.device_count() < DEVICES,
                                reason=f'needs {DEVICES} (simulated) devices')


def make_tx(axis_name=None):
  return optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=100,
                         rule=ghl_jax.Rule(t_inv=T_INV), axis_name=axis_name)


def make_step(model, tx, *, train, axis_name=None, fused=False):
  """``(params, batch_stats, opt_state, images, labels, rng) -> (params, batch_stats, opt_state)``:
  the Hebbian terms from taps, or (``fused``) from ``ghl_jax.value_and_grad``."""
  rule = ghl_jax.Rule('softmax_oja', t_inv=T_INV)

  def step(params, batch_stats, opt_state, images, labels, rng):
    def loss_fn(p):
      out = (model.apply if fused else ghl_jax.tap(model.apply))(
          {'params': p, 'batch_stats': batch_stats}, images, train=train,
          mutable=['batch_stats'], rngs={'dropout': rng})
      (logits, state), taps = (out, None) if fused else out
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (state['batch_stats'], taps)

    local = params if axis_name is None else jax.lax.pcast(params, axis_name, to='varying')
    if fused:
      (_, (new_stats, _)), grads, hebb = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True)(local)
      extra = {'hebb': hebb}
    else:
      grads, (new_stats, taps) = jax.grad(loss_fn, has_aux=True)(local)
      extra = {'taps': taps}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_stats, opt_state
  return step


def setup(dropout_rate):
  model = models.DeepHebb(num_classes=10, width=0.05, dropout_rate=dropout_rate)
  images = jax.random.normal(jax.random.PRNGKey(0), (GLOBAL_BATCH, 32, 32, 3))
  labels = jnp.arange(GLOBAL_BATCH) % 10
  variables = model.init(jax.random.PRNGKey(1), images, train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  args = (params, batch_stats, make_tx().init(params), images, labels, jax.random.PRNGKey(2))
  return model, args


def single_device(model, args, *, train):
  """The reference: the same step on one device and the global batch."""
  on_one = jax.device_put(args, jax.devices()[0])
  return jax.jit(make_step(model, make_tx(), train=train))(*on_one)


@pytest.fixture(scope='module')
def eval_mode():
  """``(model, args, single-device result)`` with BN in eval mode and no dropout."""
  model, args = setup(dropout_rate=0.0)
  return model, args, single_device(model, args, train=False)


def assert_same_step(actual, expected):
  actual_params, actual_stats, _ = actual
  expected_params, expected_stats, _ = expected
  for tree_a, tree_e in ((actual_params, expected_params), (actual_stats, expected_stats)):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(tree_a), jax.tree.leaves(tree_e)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-7,
                                 err_msg=jax.tree_util.keystr(path))


def data_mesh():
  return Mesh(np.array(jax.devices()[:DEVICES]), ('data',), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize('fused', [False, True], ids=['taps', 'fused'])
def test_jit_over_sharded_batch_equals_single_device_in_training_mode(fused):
  model, (params, stats, opt_state, images, labels, rng) = setup(dropout_rate=0.5)
  expected = single_device(model, (params, stats, opt_state, images, labels, rng), train=True)
  mesh = data_mesh()
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  args = (jax.device_put((params, stats, opt_state), replicated) +
          jax.device_put((images, labels), sharded) + (jax.device_put(rng, replicated),))
  assert args[3].sharding == sharded and len(args[3].addressable_shards) == DEVICES
  actual = jax.jit(make_step(model, make_tx(), train=True, fused=fused),
                   out_shardings=replicated)(*args)
  assert actual[0]['conv1']['kernel'].sharding == replicated
  assert_same_step(actual, expected)


@pytest.mark.parametrize('fused', [False, True], ids=['taps', 'fused'])
def test_shard_map_with_axis_name_equals_single_device(eval_mode, fused):
  model, (params, stats, opt_state, images, labels, rng), expected = eval_mode
  step = make_step(model, make_tx('data'), train=False, axis_name='data', fused=fused)
  mapped = jax.shard_map(step, mesh=data_mesh(),
                         in_specs=(P(), P(), P(), P('data'), P('data'), P()), out_specs=P())
  actual = jax.jit(mapped)(params, stats, opt_state, images, labels, rng)
  assert_same_step(actual, expected)


def test_pmap_with_axis_name_equals_single_device(eval_mode):
  model, (params, stats, opt_state, images, labels, rng), expected = eval_mode
  step = make_step(model, make_tx('data'), train=False, axis_name='data')
  replicate = functools.partial(jax.tree.map, lambda a: jnp.broadcast_to(a, (DEVICES,) + a.shape))
  per_device = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
  actual = jax.pmap(step, axis_name='data', devices=jax.devices()[:DEVICES])(
      *replicate((params, stats, opt_state)), per_device(images), per_device(labels),
      replicate(rng))
  for replica in range(1, DEVICES):
    np.testing.assert_array_equal(actual[0]['conv2']['kernel'][replica],
                                  actual[0]['conv2']['kernel'][0])
  assert_same_step(jax.tree.map(lambda a: a[0], actual), expected)


def test_without_axis_name_shard_map_gives_a_different_h_hat(eval_mode):
  """Control: without the psum each device normalises its own local term."""
  model, (params, stats, opt_state, images, labels, rng), expected = eval_mode
  step = make_step(model, make_tx(), train=False, axis_name='data')
  mapped = jax.shard_map(step, mesh=data_mesh(),
                         in_specs=(P(), P(), P(), P('data'), P('data'), P()), out_specs=P(),
                         check_vma=False)
  actual = jax.jit(mapped)(params, stats, opt_state, images, labels, rng)
  assert not np.allclose(actual[0]['conv1']['kernel'], expected[0]['conv1']['kernel'],
                         rtol=1e-5, atol=1e-7)


def test_hebbian_terms_under_shard_map_are_per_device(eval_mode):
  """Replicated params, sharded taps: psum of the local raw terms is the global-batch term."""
  model, (params, stats, _, images, _, _), _ = eval_mode
  variables = {'params': params, 'batch_stats': stats}

  def terms(images):
    _, taps = ghl_jax.tap(model.apply)(variables, images, train=False)
    return ghl_jax.hebbian_terms(params, taps, t_inv=T_INV)

  local_sum = jax.shard_map(lambda x: jax.lax.psum(terms(x), 'data'), mesh=data_mesh(),
                            in_specs=P('data'), out_specs=P())
  expected = jax.jit(terms)(images)
  for path, term in jax.jit(local_sum)(images).items():
    np.testing.assert_allclose(term.term, expected[path].term, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(expected[path].term).max()), err_msg=path)
