"""Every config file loads, passes validation, and its sweep expands into launch commands."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from ghl_jax import models
from ghl_jax.train import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'experiments', 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'common.py', 'recipes.py', 'baselines.py'))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_config_is_valid(path, arg):
  config = load(path, arg)
  validate.validate(config, device_count=1)
  assert config.model.name in models.names()
  if arg == 'runlocal':
    assert 0 < config.num_train_steps <= 100


def test_paper_recipe_values():
  dh = load(os.path.join(REPO, 'experiments', 'configs', 'cifar10_deephebb_ghl.py'))
  assert (dh.optimizer.lr_conv, dh.optimizer.wd_conv, dh.optimizer.lr) == (1e-2, 5e-2, 5e-3)
  assert (dh.batch_size, dh.num_epochs, dh.data.augment, dh.data.normalize) == (64, 100, 'none', 'half')
  assert dict(dh.ghl.t_inv) == {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}
  fh = load(os.path.join(REPO, 'experiments', 'configs', 'cifar100_fasthebb_bp.py'))
  assert (fh.optimizer.lr_conv, fh.optimizer.wd_conv, fh.optimizer.lr, fh.method) == (5e-2, 1e-2, 1e-4, 'bp')


def test_unknown_switch_is_refused():
  with pytest.raises(ValueError, match='Unknown config switch'):
    load(os.path.join(REPO, 'experiments', 'configs', 'cifar10_deephebb_ghl.py'), 'runlokal')


def test_sweep_dry_run_lists_every_depth(tmp_path):
  result = subprocess.run(
      [sys.executable, 'launch/sweep.py', 'experiments/configs/cifar10_resnet_ghl.py',
       f'--workdir_root={tmp_path}', '--dry_run'], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [l for l in result.stdout.splitlines() if 'experiments.main' in l]
  assert len(lines) == 6
  for depth, line in zip((20, 32, 44, 56, 110, 1202), lines):
    assert f'--config.model.name=resnet{depth}' in line and f'name=resnet{depth}' in line.split('--workdir=')[1]
  assert not os.listdir(tmp_path)                      # dry run: nothing ran
