"""End-to-end: train_and_evaluate on a tiny real tfds dataset, 1 vs 8 devices, resume, bad input."""
import json
import os
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import pytest

from experiments.configs import common
from ghl_jax.train import data as data_lib
from ghl_jax.train import plots
from ghl_jax import train
from ghl_jax.train.validate import ConfigError

CACHE = os.path.join(tempfile.gettempdir(), 'ghl_jax_test_xla_cache')   # shared by tests and workers
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, name, **overrides):
  c = common.base()
  common.paper_recipe(c, 'deephebb')
  c.model.kwargs.width = 0.05
  c.data.update({'name': name, 'data_dir': data_dir})
  c.batch_size, c.eval_batch_size = 16, 16
  c.num_train_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 6, 1, 6, 3
  c.compilation_cache_dir = CACHE
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def final_params(workdir):
  return plots.latest_params(workdir)


def run_in_subprocess(devices, config_args, workdir):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'experiments.main', *config_args, f'--workdir={workdir}'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def cli_args(data_dir, name, config='experiments/configs/cifar10_deephebb_ghl.py', **extra):
  args = {'model.kwargs.width': 0.05, 'data.name': name, 'data.data_dir': data_dir,
          'batch_size': 16, 'eval_batch_size': 16, 'num_train_steps': 6, 'log_every_steps': 1,
          'eval_every_steps': 6, 'checkpoint_every_steps': 3, 'compilation_cache_dir': CACHE, **extra}
  return [f'--config={config}'] + [f'--config.{k}={v}' for k, v in args.items()]


@pytest.fixture(scope='module')
def ghl_run(tiny_tfds, tmp_path_factory):
  """A 6-step GHL run on 8 devices: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp('ghl8'))
  metrics = train.train_and_evaluate(tiny_config(*tiny_tfds), workdir)
  return workdir, metrics


def test_eight_devices_trains_logs_and_checkpoints(ghl_run):
  workdir, metrics = ghl_run
  assert jax.device_count() == 8
  assert set(metrics) == {'eval/loss', 'eval/top1', 'eval/top5'}
  assert 0.0 <= metrics['eval/top1'] <= metrics['eval/top5'] <= 1.0
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ('l2/params', 'l2/updates', 'lr/ghl', 'lr/other', 'hebb/conv2/max_abs', 'hebb/conv3/sign_agreement'):
    assert key in train_rows[0], key
  # Cosine schedule per step: lr at step s is peak * (1 + cos(pi s / T)) / 2.
  np.testing.assert_allclose([r['lr/ghl'] for r in train_rows],
                             [1e-2 * (1 + np.cos(np.pi * s / 6)) / 2 for s in range(6)], rtol=1e-6)
  assert os.path.isdir(os.path.join(workdir, 'tensorboard'))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == [3, 6]


def test_one_device_matches_eight_devices(tiny_tfds, ghl_run, tmp_path):
  """The same global batches on 1 device (a fresh process) give the same params as on 8."""
  result = run_in_subprocess(1, cli_args(*tiny_tfds), str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  chex.assert_trees_all_close(final_params(str(tmp_path)), final_params(ghl_run[0]), rtol=2e-4, atol=1e-6)


def test_resume_after_interruption_is_exact(tiny_tfds, ghl_run, tmp_path, monkeypatch):
  """Killed after step 4 (checkpoint at 3), restarted: final params equal the uninterrupted run's."""
  workdir = str(tmp_path)
  real = data_lib.train_batches

  def dies_after_four(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if kwargs.get('start_step', 0) + i == 4:
        raise KeyboardInterrupt('simulated preemption')
      yield batch

  monkeypatch.setattr(data_lib, 'train_batches', dies_after_four)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(*tiny_tfds), workdir)
  monkeypatch.setattr(data_lib, 'train_batches', real)
  train.train_and_evaluate(tiny_config(*tiny_tfds), workdir)
  chex.assert_trees_all_equal(final_params(workdir), final_params(ghl_run[0]))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if 'loss' in r]
  assert steps == [1, 2, 3, 4, 5, 6]     # step 4's metrics were still in flight at the kill


def test_bp_and_accumulation_run(tiny_tfds, tmp_path):
  """BP with the strong recipe, and GHL with 2 micro-batches, both train and evaluate."""
  bp = train.train_and_evaluate(tiny_config(*tiny_tfds, method='bp', **{'optimizer.name': 'momentum_sgd',
                                                                        'optimizer.lr': 0.01}),
                                str(tmp_path / 'bp'))
  acc = train.train_and_evaluate(tiny_config(*tiny_tfds, grad_accum_steps=2, num_train_steps=2,
                                             eval_every_steps=2), str(tmp_path / 'acc'))
  assert np.isfinite(bp['eval/loss']) and np.isfinite(acc['eval/loss'])


@pytest.mark.parametrize('override, message', [
    ({'model.name': 'resnet7'}, 'Unknown model'),
    ({'batch_size': 12}, 'not divisible by the 8 devices'),
    ({'data.name': 'no_such_dataset'}, 'config.data.download=True'),
    ({'data.name': 'cifar10', 'data.data_dir': '/nonexistent/tfds'}, 'python -m ghl_jax.train.data.offline cifar10'),
])
def test_bad_input_one_clear_line(tiny_tfds, tmp_path, override, message):
  with pytest.raises((ConfigError, data_lib.DatasetMissingError)) as error:
    train.train_and_evaluate(tiny_config(*tiny_tfds, **override), str(tmp_path))
  assert message in str(error.value) and '\n' not in str(error.value)


def test_cli_error_is_one_line(tiny_tfds, tmp_path):
  result = run_in_subprocess(8, cli_args(*tiny_tfds, **{'model.name': 'resnet7'}), str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: Unknown model')
