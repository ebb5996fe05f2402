"""Every config file loads, passes validation, and its sweep expands into launch commands."""
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ghl_jax import models
from ghl_jax.train import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'experiments', 'configs', '*.py'))
                 if 'def get_config(' in open(p).read())              # not the recipe modules
QUICKSTART = os.path.join(REPO, 'experiments', 'configs', 'quickstart.py')

# Model -> (its first conv, that conv's output channels by default: at width 1, or ViT's hidden_dim).
FIRST_CONV = {'deephebb': ('conv1', 96), 'deephebb_softhebb': ('conv1', 96), 'fasthebb': ('conv1', 96),
              'vgg16': ('conv1_1', 64), 'resnet18': ('stem_conv', 64), 'resnet50': ('stem_conv', 64),
              **{f'resnet{depth}': ('stem_conv', 16) for depth in models.CIFAR_RESNET_DEPTHS},
              'vit_tiny': ('patch_conv', 192), 'vit_b16': ('patch_conv', 768)}
IMAGE_SIZES = {'fashion_mnist': 28, 'cifar10': 32, 'cifar100': 32}


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


def first_conv_kernel(config) -> tuple:
  """Kernel shape of the first conv of the model ``config`` describes, traced (no compute)."""
  model = models.build(config.model.name, **config.model.kwargs)
  size = config.data.get('image_size') or IMAGE_SIZES[config.data.name]
  images = jax.ShapeDtypeStruct((1, size, size, 1 if config.data.name == 'fashion_mnist' else 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return variables['params'][FIRST_CONV[config.model.name][0]]['kernel'].shape


def declared_channels(config) -> int:
  """First-conv channels the config declares: ViT's ``hidden_dim``, else the default times ``width``."""
  kwargs, default = config.model.kwargs, FIRST_CONV[config.model.name][1]
  if config.model.name.startswith('vit'):
    return kwargs.get('hidden_dim', default)
  return max(1, round(default * kwargs.get('width', 1.0)))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_model_has_the_width_its_config_declares(path):
  config = load(path)
  assert first_conv_kernel(config)[-1] == declared_channels(config), dict(config.model.kwargs)


@pytest.mark.parametrize('arg, channels', [(None, 24), ('width=0.5', 48), ('runlocal', 12)])
def test_quickstart_trains_deephebb_at_its_own_width(arg, channels):
  config = load(QUICKSTART, arg)
  assert (config.model.name, config.data.name) == ('deephebb', 'fashion_mnist')
  assert first_conv_kernel(config) == (5, 5, 1, channels)         # 96 * width, one gray channel


@pytest.mark.parametrize('arg, runlocal', [
    ('runlocal', True), ('runlocal=true', True), ('runlocal=YES', True), ('runlocal=1', True),
    ('runlocal=False', False), ('runlocal=no', False), ('runlocal=0', False), (None, False)])
def test_boolean_switch_reads_true_and_false(arg, runlocal):
  assert load(QUICKSTART, arg).num_train_steps == (60 if runlocal else 600)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_runlocal_false_is_the_full_run(path):
  assert load(path, 'runlocal=false').to_dict() == load(path).to_dict()


@pytest.mark.parametrize('arg, message', [
    ('runlocal=maybe', "runlocal='maybe' is not a boolean: use true/false, 1/0, yes/no"),
    ('runlocal=', "runlocal='' is not a boolean"),
    ('steps=many', "steps='many' is not of type int"),
    ('width=wide', "width='wide' is not of type float"),
    ('steps', 'steps needs a value'),
    ('steps=-5', 'steps=-5 must be >= 1'),
])
def test_bad_switch_value_is_one_line(arg, message):
  with pytest.raises(ValueError) as error:
    load(QUICKSTART, arg)
  assert message in str(error.value) and '\n' not in str(error.value), str(error.value)


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
