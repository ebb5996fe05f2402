"""Shared config pieces: the default fields of every run and the paper's recipes.

A config file defines ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``;
``arg`` is the text after ``:`` in ``--config=file.py:runlocal`` (comma-separated switches).
``runlocal`` (or ``runlocal=true``; booleans read true/false/1/0/yes/no) shrinks any config to
run on a laptop CPU in minutes.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

CIFAR_HALF = 'half'   # the paper's ToTensor + Normalize(0.5, 0.5): pixels in [-1, 1]
WIDTH_MODELS = ('deephebb', 'deephebb_softhebb', 'fasthebb')
DEEPHEBB_T_INV = {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}

# Test accuracy reported by the paper (algorithm.md §4), for tables beside our numbers.
PAPER = {
    ('cifar10', 'deephebb', 'ghl'): 86.41, ('cifar10', 'deephebb', 'bp'): 86.98,
    ('cifar100', 'deephebb', 'ghl'): 62.40, ('cifar100', 'deephebb', 'bp'): 63.58,
    ('cifar10', 'fasthebb', 'ghl'): 83.96, ('cifar10', 'fasthebb', 'bp'): 84.71,
    ('cifar100', 'fasthebb', 'ghl'): 57.23, ('cifar100', 'fasthebb', 'bp'): 57.49,
    ('cifar10', 'deephebb', 'softhebb'): 80.36, ('cifar100', 'deephebb', 'softhebb'): 55.94,
    ('cifar10', 'fasthebb', 'swta'): 55.23, ('cifar100', 'fasthebb', 'swta'): 21.04,
    ('cifar10', 'fasthebb', 'hpca'): 67.73, ('cifar100', 'fasthebb', 'hpca'): 37.47,
    ('imagenet2012', 'deephebb', 'ghl'): 53.71, ('imagenet2012', 'deephebb', 'bp'): 58.84,
    ('imagenet2012', 'fasthebb', 'ghl'): 50.80, ('imagenet2012', 'fasthebb', 'bp'): 56.64,
    ('imagenet2012', 'vgg16', 'ghl'): 65.58, ('imagenet2012', 'vgg16', 'bp'): 71.50,
    ('imagenet2012', 'resnet18', 'ghl'): 65.78, ('imagenet2012', 'resnet18', 'bp'): 69.57,
    ('imagenet2012', 'resnet50', 'ghl'): 73.14, ('imagenet2012', 'resnet50', 'bp'): 75.99,
    ('imagenet2012', 'deephebb', 'softhebb'): 26.08, ('imagenet2012', 'fasthebb', 'swta'): 4.75,
    ('imagenet2012', 'fasthebb', 'hpca'): 19.42,
}


TRUE_WORDS, FALSE_WORDS = ('true', '1', 'yes'), ('false', '0', 'no')


def parse_bool(text, name: str) -> bool:
  """``true/false/1/0/yes/no`` (any case) as a bool; any other text is refused."""
  word = str(text).strip().lower()
  if word in TRUE_WORDS or word in FALSE_WORDS:
    return word in TRUE_WORDS
  words = ', '.join(f'{yes}/{no}' for yes, no in zip(TRUE_WORDS, FALSE_WORDS))
  raise ValueError(f'{name}={text!r} is not a boolean: use {words} (any case).')


def _switch(key: str, text: str | None, default):
  """The value of switch ``key`` from ``text`` (None: the bare ``key``), typed as ``default``."""
  if isinstance(default, bool):
    return True if text is None else parse_bool(text, f'Config switch {key}')
  if text is None:
    raise ValueError(f'Config switch {key} needs a value: write {key}=VALUE (default {default!r}).')
  if default is None or isinstance(default, str):
    return text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f'Config switch {key}={text!r} is not of type {type(default).__name__} '
                     f'(default {default!r}).') from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'runlocal,method=bp'`` → ConfigDict(runlocal=True, method='bp') over ``defaults``.

  A switch takes the type of its default; booleans read only true/false/1/0/yes/no (any case),
  and a bare boolean switch is True.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, has_value, value = item.partition('=')
    if key not in out:
      raise ValueError(f'Unknown config switch {key!r}; known switches: {sorted(out)}.')
    out[key] = _switch(key, value if has_value else None, defaults[key])
  return ml_collections.ConfigDict(out)


def base() -> ml_collections.ConfigDict:
  """Defaults of every run; config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'ghl'                      # 'ghl' | 'bp' | 'hebbian' (unsupervised rule, then probe)
  c.model = ml_collections.ConfigDict({'name': 'deephebb', 'kwargs': ml_collections.ConfigDict()})
  c.data = ml_collections.ConfigDict({
      'name': 'cifar10', 'data_dir': placeholder(str), 'download': False, 'manual_dir': placeholder(str),
      'train_split': 'train', 'eval_split': 'test', 'augment': 'none', 'image_size': placeholder(int),
      'normalize': CIFAR_HALF,
  })
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_epochs = 100
  # Step counts: -1 is the one 'unset' value (the comment says what it means); others are >= 1.
  c.num_train_steps = -1                 # -1: num_epochs epochs; > 0 overrides num_epochs
  c.steps_per_epoch = -1                 # -1: from the dataset size; > 0 overrides it (tests, mock data)
  c.grad_accum_steps = 1
  c.compute_dtype = 'float32'            # or 'bfloat16', or 'auto' (accel.compute_dtype); params, Hebbian terms stay f32
  c.conv_impl = 'auto'                   # 'xla' | 'gemm' (conv backward as GEMMs); 'auto': gemm on CPU
  c.optimizer = ml_collections.ConfigDict({
      'name': 'paper_sgd', 'lr': 5e-3, 'lr_conv': 1e-2, 'wd_conv': 5e-2,
      'momentum': 0.9, 'nesterov': True, 'weight_decay': 5e-4, 'warmup_steps': 0,
  })
  c.ghl = ml_collections.ConfigDict({
      'layers': placeholder(str),        # None: every nn.Conv kernel; else regex over kernel paths
      't_inv': ml_collections.ConfigDict(),  # {module path or regex: t_inv}; unmatched: 1.0
      'rule': 'softmax_oja', 'rule_kwargs': ml_collections.ConfigDict(),
      'direction': 'gradient', 'magnitude': 'hebbian',
      'per_head': False,                 # True: each head of a multi-output kernel competes alone
      'shadow': False,                   # method 'bp': at log steps, what GHL would have done (align/*)
  }, type_safe=False)                    # t_inv may become a per-layer mapping
  c.hebbian = ml_collections.ConfigDict({   # method 'hebbian': local rule (phase 1), then a probe
      'layers': placeholder(str),        # kernels trained by the rule; None: every nn.Conv kernel
      'rule': 'softhebb', 't_inv': 1.0, 'rule_kwargs': ml_collections.ConfigDict(),
      'lr': 0.01,                        # float or {module path or regex: float}
      'norm_power': placeholder(float),  # SoftHebb's rate lr·(|‖W_k‖−1|+1e-10)^p; None: constant lr
      'epochs': 1.0, 'num_steps': -1,    # -1: epochs passes; num_steps >= 0 overrides epochs
      'batch_size': 10,
      'trainable': r'classifier',        # regex of the params the probe trains (the rest frozen)
      'probe_schedule': 'cosine',        # or 'halving' (Adam halved at 20/35/50/60/70/80/90 %)
  }, type_safe=False)                    # lr and t_inv may become per-layer mappings
  c.log_every_steps = 50                 # >= 1
  c.eval_every_steps = -1                # -1: once per epoch; else >= 1
  c.checkpoint_every_steps = 500         # >= 1
  c.keep_checkpoints = 2
  c.compilation_cache_dir = '~/.cache/ghl_jax/xla'  # '' disables the persistent cache
  c.force = False                        # resume a workdir written by a different model/dataset
  c.profile_steps = placeholder(object)  # '10,12' or [10, 12]: jax.profiler trace of steps 10-12 in WORKDIR/profile
  c.sweep = ()                           # list of override dicts, expanded by launch/sweep.py
  # Fault tolerance (ghl_jax/train/watchdog.py). Off for interactive use; launch/gpu.sh and
  # launch/tpu_pod.sh turn it on. A phase past its timeout: one line, exit 75 (launch/ restarts).
  c.watchdog = ml_collections.ConfigDict({
      'enabled': False,
      'startup_s': 3600.0,               # start-up and each phase's first (compiling) step
      'restore_s': 1800.0, 'step_s': 600.0, 'eval_s': 3600.0, 'save_s': 1800.0,   # 0: no limit
      'step_factor': 50.0,               # step limit >= this x the median measured step
      'sigterm_grace_s': 120.0,          # SIGTERM: save and stop within this, else exit 76; 0: wait
      'heartbeat_s': 100,                # multi-process: a silent peer is dead after this (jax.distributed)
      'shutdown_s': 300,                 # multi-process: how long an exiting process waits for the others
  })
  return c


def paper_recipe(c: ml_collections.ConfigDict, model: str) -> None:
  """The authors' hyper-parameters (README of their code): batch 64, 100 epochs, cosine, width 1.0.

  It overwrites those fields: call it before a config sets its own (e.g. a smaller width)."""
  lr_conv, wd_conv, lr = {'deephebb': (1e-2, 5e-2, 5e-3), 'fasthebb': (5e-2, 1e-2, 1e-4)}[model]
  c.optimizer.update({'name': 'paper_sgd', 'lr': lr, 'lr_conv': lr_conv, 'wd_conv': wd_conv})
  c.batch_size, c.num_epochs = 64, 100
  c.model.kwargs.width = 1.0
  if model == 'deephebb':
    c.ghl.t_inv = ml_collections.ConfigDict(DEEPHEBB_T_INV)


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks a run for a laptop CPU: tiny width, few steps, small eval."""
  if c.model.name in WIDTH_MODELS:
    c.model.kwargs.width = min(c.model.kwargs.get('width', 1.0), 0.125)
  if c.data.get('image_size') and c.data.image_size > 64:
    c.data.image_size = 64
  c.batch_size = min(c.batch_size, 32)
  c.eval_batch_size = 128
  c.num_train_steps = 60
  c.log_every_steps = 10
  c.eval_every_steps = 60
  c.checkpoint_every_steps = 30
