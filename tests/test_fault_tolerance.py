"""Scale-out and faults: several processes, kills at any step, corrupt and foreign workdirs,
hostile configs, NaN/Inf. Each run trains DeepHebb (width 0.05) on the tiny tfds dataset."""
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from experiments.configs import common
from ghl_jax.train import data as data_lib
from ghl_jax.train import metrics as metrics_lib
from ghl_jax.train import plots
from ghl_jax import train
from ghl_jax.train import methods
from ghl_jax.train import run_config
from ghl_jax.train.validate import ConfigError
from test_train import REPO, tiny_config

STEPS = 8


def flat_overrides(config) -> dict:
  """The config as ``{dotted.field: value}`` for a worker process."""
  return run_config.flatten(config)


def start_worker(config, workdir, *, devices=8, process_id=0, num_processes=1, port=0):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  args = [sys.executable, os.path.join(REPO, 'tests', 'distributed_worker.py'), str(process_id),
          str(num_processes), str(port), workdir, json.dumps(flat_overrides(config))]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [r['step'] for r in metrics_lib.read(workdir) if 'loss' in r]


def wait_for(predicate, process, timeout=300.0, poll=0.01):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    if process.poll() is not None:
      return False
    time.sleep(poll)
  raise TimeoutError('worker made no progress')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def checkpoint_digest(workdir):
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(workdir, 'checkpoints', '**'), recursive=True)):
    if os.path.isfile(path):
      digest.update(path.encode())
      digest.update(open(path, 'rb').read())
  return digest.hexdigest()


@pytest.fixture(scope='module')
def reference(tiny_tfds, tmp_path_factory):
  """An uninterrupted 8-step run on 8 devices, checkpointing every step: its workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(tiny_config(*tiny_tfds, num_train_steps=STEPS, checkpoint_every_steps=1,
                                       eval_every_steps=STEPS), workdir)
  return workdir


def copy_of(workdir, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(workdir, target)
  return target


# --------------------------------------------------------------------------------------------
# Multi-process training.

def test_two_processes_match_one_process_on_the_same_global_batches(tiny_tfds, tmp_path, monkeypatch):
  """2 processes × 2 devices over loopback (gloo) equal 1 process over the concatenated batches."""
  config = tiny_config(*tiny_tfds, num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
  port = free_port()
  workdir = str(tmp_path / 'multi')
  workers = [start_worker(config, workdir, devices=2, process_id=i, num_processes=2, port=port)
             for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  finals = [json.loads(line[len('FINAL '):]) for out in outputs for line in out.splitlines()
            if line.startswith('FINAL ')]
  assert finals[0] == finals[1]                         # every process sees the global eval metrics
  assert sum('step 4/4' in out for out in outputs) == 1  # progress printed by process 0 only

  real = data_lib.train_batches

  def both_slices(*args, **kwargs):
    kwargs.update(process_count=2)
    streams = [real(*args, **dict(kwargs, process_index=i)) for i in range(2)]
    for parts in zip(*streams):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  monkeypatch.setattr(data_lib, 'train_batches', both_slices)
  single = train.train_and_evaluate(config, str(tmp_path / 'single'))
  chex.assert_trees_all_close(plots.latest_params(workdir), plots.latest_params(str(tmp_path / 'single')),
                              rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(finals[0]['eval/loss'], single['eval/loss'], rtol=1e-4)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']   # written once
  assert logged_steps(workdir) == [1, 2, 3, 4]                                      # one writer


# --------------------------------------------------------------------------------------------
# Preemption: SIGTERM, and SIGKILL at random steps and during a checkpoint save.

def test_killed_anywhere_resumes_to_identical_params(tiny_tfds, reference, tmp_path):
  config = tiny_config(*tiny_tfds, num_train_steps=STEPS, checkpoint_every_steps=1,
                       eval_every_steps=STEPS)
  workdir = str(tmp_path / 'run')
  rng = random.Random(0)

  # 1. SIGTERM after a random step: a final checkpoint, then a clean exit.
  worker = start_worker(config, workdir)
  wait_for(lambda: len(logged_steps(workdir)) >= rng.randint(1, 2), worker)
  worker.send_signal(signal.SIGTERM)
  out = worker.communicate(timeout=300)[0]
  assert worker.returncode == 0, out[-3000:]
  saved = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert saved == logged_steps(workdir)[-1]

  # 2. SIGKILL while a checkpoint is being written (its temporary directory exists).
  worker = start_worker(config, workdir)
  in_save = lambda: glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*')) and logged_steps(workdir)[-1] > saved
  wait_for(in_save, worker, poll=0.001)
  worker.kill()
  worker.communicate(timeout=60)

  # 3. SIGKILL at a random later step.
  worker = start_worker(config, workdir)
  target = rng.randint(logged_steps(workdir)[-1] + 1, STEPS - 1)
  wait_for(lambda: logged_steps(workdir) and logged_steps(workdir)[-1] >= target, worker)
  time.sleep(rng.random() * 0.2)
  worker.kill()
  worker.communicate(timeout=60)

  # 4. Run to the end.
  worker = start_worker(config, workdir)
  out = worker.communicate(timeout=600)[0]
  assert worker.returncode == 0, out[-3000:]
  chex.assert_trees_all_equal(plots.latest_params(workdir), plots.latest_params(reference))
  assert logged_steps(workdir) == list(range(1, STEPS + 1))      # no step lost or repeated
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, STEPS + 1))


def test_corrupt_latest_checkpoint_falls_back_and_half_written_is_ignored(tiny_tfds, reference, tmp_path, capsys):
  workdir = copy_of(reference, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert sorted(s for s in os.listdir(checkpoints) if s.isdigit()) == [str(STEPS - 1), str(STEPS)]
  for path in glob.glob(os.path.join(checkpoints, str(STEPS), '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  os.makedirs(os.path.join(checkpoints, f'{STEPS + 1}.orbax-checkpoint-tmp-123'))   # a save cut short
  train.train_and_evaluate(tiny_config(*tiny_tfds, num_train_steps=STEPS, checkpoint_every_steps=1,
                                       eval_every_steps=STEPS), workdir)
  assert f'checkpoint at step {STEPS} is unreadable' in capsys.readouterr().out
  chex.assert_trees_all_equal(plots.latest_params(workdir), plots.latest_params(reference))
  assert os.path.isdir(os.path.join(checkpoints, f'corrupt-{STEPS}'))


def test_foreign_workdir_is_refused_unless_forced(tiny_tfds, reference, tmp_path):
  workdir = copy_of(reference, tmp_path)
  before = checkpoint_digest(workdir)
  with pytest.raises(ConfigError, match='belongs to another run.*model.name'):
    train.train_and_evaluate(tiny_config(*tiny_tfds, **{'model.name': 'fasthebb'}), workdir)
  other_data = tiny_config(*tiny_tfds, num_train_steps=STEPS + 1)
  other_data.data.name = 'tiny_gray'
  with pytest.raises((ConfigError, data_lib.DatasetMissingError)):
    train.train_and_evaluate(other_data, workdir)
  assert checkpoint_digest(workdir) == before
  forced = tiny_config(*tiny_tfds, num_train_steps=STEPS + 1, force=True, eval_every_steps=STEPS + 1)
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump({'model.name': 'deephebb', 'data.name': 'another_dataset'}, f)
  train.train_and_evaluate(forced, workdir)
  assert logged_steps(workdir)[-1] == STEPS + 1


# --------------------------------------------------------------------------------------------
# Hostile input: one clear line before any step, existing checkpoints untouched.

HOSTILE = [
    ({'model.name': 'resnet7'}, 'Unknown model'),
    ({'data.name': 'no_such_dataset'}, 'no_such_dataset is not in'),
    ({'data.name': 'cifar10', 'data.data_dir': '/nonexistent/tfds'}, 'python -m ghl_jax.train.data.offline'),
    ({'optimizer.name': 'lion'}, 'Unknown optimizer'),
    ({'method': 'magic'}, 'Unknown method'),
    ({'ghl.rule': 'bcm'}, 'Unknown Hebbian rule'),
    ({'optimizer.lr': 0.0}, 'config.optimizer.lr must be a number > 0; got 0.0'),
    ({'optimizer.lr': -0.1}, 'config.optimizer.lr must be a number > 0'),
    ({'optimizer.lr_conv': 0.0}, 'config.optimizer.lr_conv must be a number > 0'),
    ({'optimizer.wd_conv': -1e-3}, 'config.optimizer.wd_conv must be a number >= 0'),
    ({'batch_size': 0}, 'config.batch_size must be an integer >= 1'),
    ({'batch_size': -16}, 'config.batch_size must be an integer >= 1'),
    ({'batch_size': 12}, 'not divisible by the 8 devices'),
    ({'eval_batch_size': 4}, 'eval_batch_size=4 is not divisible'),
    ({'batch_size': 128}, 'exceeds the 96 training examples'),
    ({'num_train_steps': 0}, 'Nothing to train'),
    ({'num_train_steps': -1, 'num_epochs': 0}, 'Nothing to train'),
    ({'grad_accum_steps': 0}, 'config.grad_accum_steps must be an integer >= 1'),
    ({'grad_accum_steps': 3}, 'equal micro-batches'),
    ({'grad_accum_steps': 4}, 'micro-batch'),
    ({'ghl.t_inv.conv1': 0.0}, 'config.ghl.t_inv must be a number > 0'),
    ({'ghl.t_inv.conv2': -0.5}, 'config.ghl.t_inv must be a number > 0'),
    ({'ghl.layers': 'no_such_layer'}, 'selects no kernel'),
    ({'ghl.direction': 'up'}, 'direction must be one of'),
    ({'ghl.magnitude': 'huge'}, 'magnitude must be one of'),
    ({'ghl.per_head': 'yes'}, 'per_head must be True or False'),
    ({'ghl.shadow': 'yes'}, 'config.ghl.shadow must be True or False'),
    ({'ghl.shadow': True}, 'config.ghl.shadow shows what GHL would do in a BP run (method bp)'),
    ({'compute_dtype': 'float16'}, 'compute_dtype must be one of'),
    ({'data.augment': 'mixup'}, 'augment'),
    ({'data.normalize': 'zscore'}, 'normalize'),
    ({'model.kwargs.depth': 3}, 'config.model.kwargs does not fit'),
    # Step counts: -1 is the only 'unset' value; no other negative count means 'use epochs'.
    ({'num_train_steps': -5}, 'config.num_train_steps must be an integer >= 1, or -1 to train config.num_epochs'),
    ({'num_train_steps': -2, 'num_epochs': 0}, 'config.num_train_steps must be an integer >= 1'),
    ({'steps_per_epoch': 0}, 'config.steps_per_epoch must be an integer >= 1, or -1'),
    ({'steps_per_epoch': -4}, 'config.steps_per_epoch must be an integer >= 1, or -1'),
    ({'eval_every_steps': 0}, 'config.eval_every_steps must be an integer >= 1, or -1 to evaluate once per epoch'),
    ({'eval_every_steps': -3}, 'config.eval_every_steps must be an integer >= 1, or -1'),
    ({'log_every_steps': 0}, 'config.log_every_steps must be an integer >= 1;'),
    ({'log_every_steps': -1}, 'config.log_every_steps must be an integer >= 1;'),
    ({'checkpoint_every_steps': 0}, 'config.checkpoint_every_steps must be an integer >= 1;'),
    ({'checkpoint_every_steps': -500}, 'config.checkpoint_every_steps must be an integer >= 1;'),
    ({'hebbian.num_steps': -2}, 'config.hebbian.num_steps must be an integer >= 0, or -1 to train config.hebbian.epochs'),
    ({'hebbian.num_steps': 2.5}, 'config.hebbian.num_steps must be an integer >= 0'),
    # Every other numeric field of common.base() (test_every_numeric_field_of_base_is_checked).
    ({'seed': -1}, 'config.seed must be an integer >= 0'),
    ({'eval_batch_size': 0}, 'config.eval_batch_size must be an integer >= 1'),
    ({'num_epochs': -2}, 'config.num_epochs must be a number > 0'),
    ({'keep_checkpoints': 0}, 'config.keep_checkpoints must be an integer >= 1'),
    ({'data.image_size': -32}, "config.data.image_size must be an integer >= 1, or None to keep the dataset's"),
    ({'data.image_size': 0}, 'config.data.image_size must be an integer >= 1'),
    ({'optimizer.momentum': 1.0}, 'config.optimizer.momentum must be a number >= 0 and < 1'),
    ({'optimizer.momentum': -0.9}, 'config.optimizer.momentum must be a number >= 0 and < 1'),
    ({'optimizer.weight_decay': -5e-4}, 'config.optimizer.weight_decay must be a number >= 0'),
    ({'optimizer.warmup_steps': -10}, 'config.optimizer.warmup_steps must be an integer >= 0 (0: no warm-up)'),
    ({'hebbian.t_inv': 0.0}, 'config.hebbian.t_inv must be a number > 0'),
    ({'hebbian.lr': -0.01}, 'config.hebbian.lr must be a number > 0'),
    ({'hebbian.norm_power': -1.0}, 'config.hebbian.norm_power must be a number >= 0, or None to keep the rate'),
    ({'hebbian.epochs': 0.0}, 'config.hebbian.epochs must be a number > 0'),
    ({'hebbian.batch_size': 0}, 'config.hebbian.batch_size must be an integer >= 1'),
    ({'watchdog.startup_s': -1.0}, 'config.watchdog.startup_s must be a number >= 0 (0: no limit)'),
    ({'watchdog.restore_s': -1.0}, 'config.watchdog.restore_s must be a number >= 0 (0: no limit)'),
    ({'watchdog.step_s': -1.0}, 'config.watchdog.step_s must be a number >= 0 (0: no limit)'),
    ({'watchdog.eval_s': -1.0}, 'config.watchdog.eval_s must be a number >= 0 (0: no limit)'),
    ({'watchdog.save_s': -1.0}, 'config.watchdog.save_s must be a number >= 0 (0: no limit)'),
    ({'watchdog.step_factor': -2.0}, 'config.watchdog.step_factor must be a number >= 0 (0: no scaling)'),
    ({'watchdog.sigterm_grace_s': -1.0}, 'config.watchdog.sigterm_grace_s must be a number >= 0'),
    ({'watchdog.heartbeat_s': 0}, 'config.watchdog.heartbeat_s must be an integer >= 1'),
    ({'watchdog.shutdown_s': -5}, 'config.watchdog.shutdown_s must be an integer >= 1'),
    # The model's own settings (ghl_jax.models.check_kwargs).
    ({'model.kwargs.width': 0.0}, 'config.model.kwargs does not fit deephebb: deephebb: width must be > 0'),
    ({'model.kwargs.width': -0.5}, 'width must be > 0'),
    ({'model.kwargs.num_classes': 0}, 'num_classes must be an integer > 0'),
    ({'model.kwargs.dropout_rate': 1.0}, 'dropout_rate must be >= 0 and < 1'),
    ({'model.kwargs.widht': 0.5}, "deephebb has no setting 'widht'; its settings: dropout_rate, dtype"),
]


@pytest.mark.parametrize('override, message', HOSTILE, ids=[str(o) for o, _ in HOSTILE])
def test_hostile_config_fails_before_training(tiny_tfds, reference, tmp_path, monkeypatch, override, message):
  workdir = copy_of(reference, tmp_path)
  before = checkpoint_digest(workdir)
  monkeypatch.setattr(methods.steps_lib, 'make_train_step',
                      lambda *a, **k: pytest.fail('a train step was built for a bad config'))
  config = tiny_config(*tiny_tfds, num_train_steps=STEPS + 4)
  with config.unlocked():
    for key, value in override.items():
      target = config
      *parents, leaf = key.split('.')
      for p in parents:
        target = target[p]
      target[leaf] = value
  with pytest.raises((ConfigError, data_lib.DatasetMissingError)) as error:
    train.train_and_evaluate(config, workdir)
  text = str(error.value)
  assert message in text and '\n' not in text, text
  assert checkpoint_digest(workdir) == before


def numeric_fields(config, prefix=''):
  """The dotted names of every numeric (or numeric-placeholder) field of ``config``."""
  for key in config.keys():
    value, name = config[key], prefix + key
    if hasattr(value, 'keys') and name not in ('ghl.t_inv', 'model.kwargs'):
      yield from numeric_fields(value, name + '.')
    elif name == 'ghl.t_inv' or (not isinstance(value, bool) and isinstance(value, (int, float))) or (
        value is None and config.get_ref(key).get_type() in (int, float)):
      yield name


def test_every_numeric_field_of_base_is_checked():
  """Each numeric field of common.base() has an out-of-range case in HOSTILE (a new field needs one)."""
  fields = set(numeric_fields(common.base()))
  covered = {key.rsplit('.', 1)[0] if key.startswith('ghl.t_inv.') else key for o, _ in HOSTILE for key in o}
  assert {'seed', 'data.image_size', 'watchdog.heartbeat_s', 'ghl.t_inv', 'hebbian.norm_power'} <= fields
  assert fields <= covered, sorted(fields - covered)


def test_unwritable_workdir(tiny_tfds, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(ConfigError, match='Cannot create --workdir'):
    train.train_and_evaluate(tiny_config(*tiny_tfds), str(blocker / 'run'))


@pytest.mark.parametrize('bad, message', [
    (lambda b: dict(b, image=b['image'][:, :16]), 'shape'),
    (lambda b: dict(b, image=(b['image'] * 100).astype(np.uint8)), 'expected floats'),
    (lambda b: dict(b, image=np.where(np.arange(b['image'].size).reshape(b['image'].shape) == 5,
                                      np.nan, b['image']).astype(np.float32)), 'NaN'),
])
def test_bad_images_fail_before_training(tiny_tfds, reference, tmp_path, monkeypatch, bad, message):
  workdir = copy_of(reference, tmp_path)
  before = checkpoint_digest(workdir)
  real = data_lib.train_batches
  monkeypatch.setattr(data_lib, 'train_batches', lambda *a, **k: (bad(b) for b in real(*a, **k)))
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(tiny_config(*tiny_tfds, num_train_steps=STEPS + 2), workdir)
  assert checkpoint_digest(workdir) == before


def test_cli_hostile_command_lines(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  ghl, quickstart = 'experiments/configs/cifar10_deephebb_ghl.py', 'experiments/configs/quickstart.py'
  cases = [
      (['--config=experiments/configs/no_such.py', f'--workdir={tmp_path}'], 'no_such.py'),
      (['--config=experiments/configs/cifar10_deephebb_ghl.py', '--config.no_such_field=1',
        f'--workdir={tmp_path}'], 'no_such_field'),
      (['--config', 'experiments/configs/no_such.py:runlocal', '--config.batch_size=8',
        f'--workdir={tmp_path}'], 'no_such.py'),
      ([f'--config={ghl}', '--config.ghl.no_such_field=1', f'--workdir={tmp_path}'], 'no_such_field'),
      ([f'--config={quickstart}:runlocal=maybe', f'--workdir={tmp_path}'], 'true/false, 1/0, yes/no'),
      ([f'--config={quickstart}:steps=many', f'--workdir={tmp_path}'], "steps='many' is not of type int"),
      ([f'--config={ghl}:runlokal', f'--workdir={tmp_path}'], 'Unknown config switch'),
      ([f'--config={ghl}', '--config.batch_size=abc', f'--workdir={tmp_path}'], 'config.batch_size'),
      ([f'--config={ghl}', '--config.force=maybe', f'--workdir={tmp_path}'], 'config.force'),
      ([f'--config={ghl}', '--config.num_train_steps=-5', f'--workdir={tmp_path}'],
       'config.num_train_steps must be an integer >= 1, or -1'),
      ([f'--workdir={tmp_path}'], '--config'),
      ([f'--config={ghl}'], '--workdir'),
      ([f'--config={ghl}', f'--workdir={tmp_path}', 'extra'], 'Unexpected arguments: extra'),
  ]
  for args, word in cases:
    result = subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert word in last, result.stderr[-2000:]
    assert last.startswith('error: ') and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert not os.listdir(tmp_path), args                 # refused before anything was written


# --------------------------------------------------------------------------------------------
# Numerical faults.

def test_nan_stops_at_that_step_naming_it_and_keeping_the_last_checkpoint(tiny_tfds, tmp_path, monkeypatch):
  real = data_lib.train_batches

  def nan_from_step_three(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      step = kwargs.get('start_step', 0) + i
      yield dict(batch, image=batch['image'] * np.nan) if step == 2 else batch

  monkeypatch.setattr(data_lib, 'train_batches', nan_from_step_three)
  with pytest.raises(train.NumericalError, match=r'step 3 in (loss|grad/conv1/kernel)'):
    train.train_and_evaluate(tiny_config(*tiny_tfds, num_train_steps=4, checkpoint_every_steps=2),
                             str(tmp_path))
  assert sorted(s for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()) == ['2']
  params = plots.latest_params(str(tmp_path))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax_leaves(params))


def test_inf_in_one_hebbian_term_names_the_layer(tiny_tfds, tmp_path):
  """An overflowing softmax temperature in conv3 only: loss and gradients stay finite."""
  config = tiny_config(*tiny_tfds, num_train_steps=2)
  config.ghl.t_inv.conv3 = 1e38
  with pytest.raises(train.NumericalError, match=r'step 1 in hebb/conv3/kernel'):
    train.train_and_evaluate(config, str(tmp_path))


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)
