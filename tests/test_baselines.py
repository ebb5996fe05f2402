"""Unsupervised Hebbian baselines (SoftHebb, SWTA-FH, HPCA-FH) and their linear probe.

One step of ``hebbian_ascent`` is checked against plain numpy: the rule terms of
``numpy_reference`` (explicit im2col), then, written here, the ascent itself::

    Ĥ = H / max|H|,   η_k = η_layer · (|‖W_k‖₂ − 1| + 1e-10)^p  (or η_layer),   ΔW_k = η_k Ĥ_k

The probe must leave the features (params and BatchNorm statistics) bit-identical, and a
``train_and_evaluate`` run with method 'hebbian' must resume exactly mid-phase and across phases.
"""
import importlib
import os
import re
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import hebbian
from ghl_jax import models
from ghl_jax.train import steps as steps_lib
from ghl_jax.train import validate
import numpy_reference as ref

from experiments.configs import baselines


class ConvDense(nn.Module):
  """A small conv (SAME padding, no bias) and a small dense layer (with bias)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(5, (3, 3), padding='SAME', use_bias=False, name='conv')(x))
    return nn.Dense(4, bias_init=nn.initializers.constant(0.3), name='dense')(x.reshape(x.shape[0], -1))


RATES = {'conv': 0.1, 'dense': 0.05}
T_INV = {'softhebb': 0.8, 'swta': 20.0, 'hpca': None}     # rule -> t_inv (hpca has none)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _conv_dense_step(rule, norm_power):
  model = ConvDense()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: 2.0 * p + 0.2, params)     # neuron norms well away from 1
  _, taps = ghl_jax.tap(model.apply)({'params': params}, x)
  tx = hebbian.hebbian_ascent(RATES, layers='conv|dense', rule=rule, t_inv=T_INV[rule] or 1.0,
                              norm_power=norm_power)
  updates, _ = tx.update(params, tx.init(params), params, taps=taps)
  return params, taps, updates


def _numpy_ascent(h, kernel, rate, norm_power):
  h_hat = h / np.abs(h).max()
  if norm_power is None:
    return rate * h_hat
  w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  norms = np.sqrt((w * w).sum(0))
  return rate * (np.abs(norms - 1.0) + 1e-10) ** norm_power * h_hat


@pytest.mark.parametrize('norm_power', [None, 0.5])
@pytest.mark.parametrize('rule', sorted(T_INV))
def test_ascent_step_matches_numpy(rule, norm_power):
  params, taps, updates = _conv_dense_step(rule, norm_power)
  flat_params, flat_updates = _flat(params), _flat(updates)
  for name in ('conv', 'dense'):
    entry = taps[name]
    sites = ref.Sites(np.asarray(entry['inputs']), flat_params[f'{name}/kernel'], entry['layer'],
                      bias=flat_params.get(f'{name}/bias'))
    h = ref.RULES[rule](sites, **({} if T_INV[rule] is None else {'t_inv': T_INV[rule]}))
    expected = _numpy_ascent(h, flat_params[f'{name}/kernel'], RATES[name], norm_power)
    np.testing.assert_allclose(flat_updates[f'{name}/kernel'], expected, rtol=2e-4, atol=1e-6)
  np.testing.assert_array_equal(flat_updates['dense/bias'], 0.0)


def test_softhebb_rate_vanishes_at_unit_norm():
  """η_k = η (|‖W_k‖ − 1| + 1e-10)^½ shrinks as the norm approaches 1 and is ~0 at 1."""
  model = nn.Dense(4, use_bias=False)
  x = jax.random.normal(jax.random.key(3), (16, 6))
  direction = np.array(jax.random.normal(jax.random.key(4), (6, 4)), np.float64)
  direction /= np.linalg.norm(direction, axis=0)
  norms = np.array([3.0, 1.5, 1.1, 1.0])
  kernel = jnp.asarray(direction * norms, jnp.float32)
  _, taps = ghl_jax.tap(model.apply)({'params': {'kernel': kernel}}, x)
  tx = hebbian.hebbian_ascent(0.08, layers='', rule='softhebb', norm_power=0.5)
  updates, _ = tx.update({'kernel': kernel}, tx.init(None), {'kernel': kernel}, taps=taps)
  h = ref.softhebb(ref.Sites(np.asarray(x), np.asarray(kernel), taps['layer']))
  h_hat = h / np.abs(h).max()
  rate = np.abs(np.asarray(updates['kernel'])).max(0) / np.abs(h_hat).max(0)   # per neuron
  np.testing.assert_allclose(rate[:3], 0.08 * np.sqrt(np.abs(norms[:3] - 1.0)), rtol=1e-3)
  assert rate[0] > rate[1] > rate[2] > rate[3]
  assert rate[3] < 0.08 * 1e-3


def test_halving_schedule():
  schedule = hebbian.halving_schedule(1e-3, 100)
  expected = [1e-3 * 0.5 ** sum(step >= b for b in (20, 35, 50, 60, 70, 80, 90)) for step in range(100)]
  np.testing.assert_allclose([float(schedule(s)) for s in range(100)], expected, rtol=1e-6)
  # Boundaries that coincide on a short run still halve once each.
  np.testing.assert_allclose(float(hebbian.halving_schedule(1.0, 2)(1)), 0.5 ** 7)


@pytest.mark.parametrize('name,trainable', [('deephebb_softhebb', 'classifier'),
                                            ('fasthebb', r'^(fc5|bn5|classifier)/')])
def test_probe_step_trains_only_the_head(name, trainable):
  model = models.build(name, num_classes=10, width=0.05)
  x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  variables = model.init(jax.random.key(1), x, train=False)
  # Running statistics away from the init values, so that frozen vs. updated is visible.
  batch_stats = jax.tree.map(lambda s: s + 0.5, variables['batch_stats'])
  tx = hebbian.probe_only(optax.sgd(0.1), trainable)
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'], 'batch_stats': batch_stats,
           'opt_state': tx.init(variables['params']), 'rng': jax.random.key(2)}
  step = jax.jit(steps_lib.make_train_step(model, tx, rule=None, trainable=trainable))
  new, _ = step(state, {'image': x, 'label': labels})
  for group in ('params', 'batch_stats'):
    before, after = _flat(state[group]), _flat(new[group])
    for path in before:
      if re.search(trainable, path):
        assert not np.array_equal(before[path], after[path]), path
      else:
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)


def test_frozen_features_use_running_averages():
  """With dropout off, the frozen model in train mode equals the model in eval mode."""
  model = models.build('deephebb', num_classes=10, width=0.05, dropout_rate=0.0)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  variables = {'params': variables['params'],
               'batch_stats': jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])}
  frozen, _ = hebbian.frozen_features(model.apply, 'classifier')(
      variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(frozen, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)


class ProbeAfterSkip(nn.Module):
  """A probe whose output also reads the input directly: not a sequential stack before it."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    z = nn.relu(nn.Dense(6, name='features')(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name='classifier')(z) + jnp.mean(x)


@pytest.mark.parametrize('name,trainable', [('deephebb_softhebb', '^classifier/'),
                                            ('fasthebb', r'^(fc5|bn5|classifier)/')])
def test_probe_split_evaluates_the_probe_alone(name, trainable):
  model = models.build(name, num_classes=10, width=0.05)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  variables = {**variables, 'batch_stats': jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])}
  features, head = hebbian.probe_split(model.apply, trainable)
  z = features(variables, x, train=False)
  np.testing.assert_allclose(head(z, variables, x, train=False), model.apply(variables, x, train=False),
                             rtol=1e-6, atol=1e-6)
  for impl in ('xla', 'gemm'):                           # the frozen convs compute nothing used: gone
    wrapped_head = hebbian.probe_split(ghl_jax.accel.wrap(model.apply, impl), trainable)[1]
    probe = jax.jit(lambda v, z: wrapped_head(z, v, jnp.zeros_like(x), train=False))
    network = jax.jit(lambda v: ghl_jax.accel.wrap(model.apply, impl)(v, x, train=False))
    flops = lambda f, *a: f.lower(*a).compile().cost_analysis()['flops']
    head_share = 0.01 if name == 'deephebb_softhebb' else 0.07    # fasthebb's fc5 + classifier: 6.2 %
    assert flops(probe, variables, z) < head_share * flops(network, variables), impl
  other = jax.random.normal(jax.random.key(2), z.shape)
  if name == 'deephebb_softhebb':                          # the probe is one dense layer: z W + b
    dense = variables['params']['classifier']
    np.testing.assert_allclose(probe(variables, other),
                               np.asarray(other) @ np.asarray(dense['kernel']) + np.asarray(dense['bias']),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='matches no variable of a module'):
    hebbian.probe_split(model.apply, '^head/')[0](variables, x, train=False)


def test_probe_evaluation_reuses_the_features(tiny_tfds, monkeypatch):
  from ghl_jax.train import evaluation, loop  # pylint: disable=import-outside-toplevel
  config = _tiny_config(tiny_tfds)
  config.eval_batch_size = 16                 # the 40 test images: three batches, the last one padded
  model, mesh = loop.build_model(config, 10), loop.make_mesh()
  x = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  eval_step = jax.jit(steps_lib.make_eval_step(model))
  full = lambda state: evaluation.evaluate(eval_step, state, config, mesh)
  probe = evaluation.ProbeEvaluation(model, config.hebbian.trainable, eval_step, config, mesh)
  builds = []
  build = probe._build
  monkeypatch.setattr(probe, '_build', lambda state: builds.append(1) or build(state))
  for scale in (1.0, -3.0):                   # the probe's params change between evaluations
    state = dict(state, params={**state['params'], 'classifier': jax.tree.map(
        lambda p: p * scale, variables['params']['classifier'])})
    expected, got = full(state), probe(state)
    assert got.keys() == expected.keys()
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=key)
  assert builds == [1] and len(probe._cache) == 3 and not probe._in_full
  assert float(sum(batch['mask'].sum() for batch in probe._cache)) == 40

  # Falls back to the full network: features over max_bytes; a probe whose output also reads the
  # input; a probe inside a scanned stack (the ViT's mlp_in), which cannot be split off.
  small = evaluation.ProbeEvaluation(model, config.hebbian.trainable, eval_step, config, mesh, max_bytes=1)
  cases = [(small, state, eval_step)]
  for other, trainable in ((ProbeAfterSkip(), '^classifier/'),
                           (models.build('vit_tiny', num_classes=10, depth=1, hidden_dim=16, heads=2, mlp_dim=32),
                            'mlp_in')):
    step = jax.jit(steps_lib.make_eval_step(other))
    init = other.init(jax.random.key(0), x, train=False)
    cases.append((evaluation.ProbeEvaluation(other, trainable, step, config, mesh),
                  {'params': init['params'], 'batch_stats': init.get('batch_stats', {})}, step))
  for evaluate, run, step in cases:
    assert evaluate(run) == evaluation.evaluate(step, run, config, mesh)
    assert evaluate._in_full and evaluate._cache is None


def test_probe_split_picks_the_first_module_holding_a_trainable_param():
  """The regex is read as probe_only reads it (param paths): naming fc5's kernel moves the split
  before fc5, however the regex is written."""
  model = models.build('fasthebb', num_classes=10, width=0.05)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  widths = {}
  for regex in ('^(fc5|bn5|classifier)/', r'^classifier/|^fc5/kernel$', 'classifier/kernel', '^bn5/'):
    features, head = hebbian.probe_split(model.apply, regex)
    z = features(variables, x, train=False)
    np.testing.assert_allclose(head(z, variables, x, train=False), model.apply(variables, x, train=False),
                               rtol=1e-6, atol=1e-6)
    widths[regex] = z.shape[-1]
  fc5_in = variables['params']['fc5']['kernel'].shape[0]
  fc5_out = variables['params']['fc5']['kernel'].shape[1]
  assert widths == {'^(fc5|bn5|classifier)/': fc5_in, r'^classifier/|^fc5/kernel$': fc5_in,
                    'classifier/kernel': fc5_out, '^bn5/': fc5_out}


BASELINE_CONFIGS = sorted(
    name for name in os.listdir(os.path.join(os.path.dirname(__file__), '..', 'experiments', 'configs'))
    if re.search(r'_(softhebb|swta|hpca|bp_strong|ablation_\w+|ablations)\.py$', name))


@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_baseline_configs_validate(arg):
  assert len(BASELINE_CONFIGS) == 20
  for name in BASELINE_CONFIGS:
    module = importlib.import_module(f'experiments.configs.{name[:-3]}')
    config = module.get_config(arg)
    validate.validate(config, device_count=1)
    if config.method == 'hebbian' and arg == 'runlocal':
      assert 0 < config.hebbian.num_steps < config.num_train_steps, name


def test_ablations_switch_one_field_each():
  reference = baselines.recipes.cifar('cifar10', 'deephebb', 'ghl').ghl.to_dict()
  for name, (field, value) in baselines.ABLATIONS.items():
    changed = baselines.ghl_ablation(name).ghl.to_dict()
    diff = {k for k in reference.keys() | changed.keys() if reference.get(k) != changed.get(k)}
    assert diff == {field.split('.')[1]}, name
  sweep = baselines.ghl_ablation_sweep()
  assert [dict(entry) for entry in sweep.sweep] == [{}] + [{f: v} for f, v in baselines.ABLATIONS.values()]


def _tiny_config(dataset):
  data_dir, name = dataset
  c = baselines.cifar_softhebb('cifar10', 'runlocal')
  c.data.update({'name': name, 'data_dir': data_dir})
  c.model.kwargs.width = 0.05
  c.hebbian.batch_size, c.hebbian.num_steps = 8, 3
  c.batch_size, c.eval_batch_size = 16, 40
  c.num_train_steps = 6                       # 3 Hebbian steps, then 3 probe steps
  c.eval_every_steps = c.checkpoint_every_steps = 1
  c.keep_checkpoints = 10
  c.log_every_steps = 1
  c.compilation_cache_dir = None
  return c


def _params_at(workdir, step=None):
  """Params of the checkpoint at ``step`` (default: the newest) as flat numpy."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  return _flat(manager.restore(step, args=ocp.args.StandardRestore())['params'])


def test_train_and_evaluate_two_phases_and_resume(tiny_tfds, tmp_path):
  from ghl_jax.train import metrics; from ghl_jax import train  # pylint: disable=import-outside-toplevel
  config = _tiny_config(tiny_tfds)
  full = str(tmp_path / 'full')
  final = train.train_and_evaluate(config, full)
  rows = metrics.read(full)
  assert {r['step']: r['phase'] for r in rows if 'phase' in r} == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
  assert [r['step'] for r in rows if 'eval/top1' in r] == [4, 5, 6]
  assert all('hebb/conv1/neuron_norm' in r for r in rows if r.get('phase') == 1)
  after = {step: _params_at(full, step) for step in (1, 3, 6)}
  assert not np.array_equal(after[1]['conv1/kernel'], after[3]['conv1/kernel'])      # phase 1 learns
  np.testing.assert_array_equal(after[1]['classifier/kernel'], after[3]['classifier/kernel'])
  for path in after[3]:                                                               # phase 2 probes
    same = np.array_equal(after[3][path], after[6][path])
    assert same != path.startswith('classifier/'), path

  for resume_at in (2, 4):                    # mid Hebbian phase; mid probe
    workdir = str(tmp_path / f'from_{resume_at}')
    shutil.copytree(full, workdir)
    for step in os.listdir(os.path.join(workdir, 'checkpoints')):
      if step.isdigit() and int(step) > resume_at:
        shutil.rmtree(os.path.join(workdir, 'checkpoints', step))
    resumed = config.copy_and_resolve_references()
    resumed.checkpoint_every_steps = 100      # the final save only
    assert train.train_and_evaluate(resumed, workdir) == final
    for path, value in _params_at(workdir).items():
      np.testing.assert_array_equal(value, after[6][path], err_msg=f'resume at {resume_at}: {path}')
