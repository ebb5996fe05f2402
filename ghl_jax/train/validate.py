"""Config checks run before anything is built: each bad value gives one line saying what to change."""
from __future__ import annotations

import os

from ghl_jax import models
from ghl_jax import rules
from ghl_jax import transform
from ghl_jax.rule import Rule

METHODS = ('ghl', 'bp', 'hebbian')
OPTIMIZERS = ('paper_sgd', 'momentum_sgd', 'adam')
DTYPES = ('float32', 'bfloat16', 'auto')

UNSET = -1   # the one 'not set' value of a step count (what it means is in STEP_FIELDS)

# Step counts: field -> (what UNSET means, or None where it is not allowed; the smallest other value).
STEP_FIELDS = {
    'num_train_steps': ('train config.num_epochs epochs', 1),
    'steps_per_epoch': ('take it from the dataset size', 1),
    'eval_every_steps': ('evaluate once per epoch', 1),
    'log_every_steps': (None, 1),
    'checkpoint_every_steps': (None, 1),
    'hebbian.num_steps': ('train config.hebbian.epochs epochs', 0),
}


class ConfigError(ValueError):
  """A config value that cannot run; the message says which field to change and how."""


def _field(config, dotted: str):
  """``config.a.b`` for ``'a.b'``."""
  for key in dotted.split('.'):
    config = config[key]
  return config


def _positive(config, *fields):
  for field in fields:
    value = _field(config, field)
    if not (isinstance(value, (int, float)) and value > 0):
      raise ConfigError(f'config.{field} must be > 0, got {value!r}.')


def _step_counts(config) -> None:
  """Each step count is an int >= its minimum, or UNSET where STEP_FIELDS gives it a meaning."""
  for field, (unset, least) in STEP_FIELDS.items():
    value = _field(config, field)
    if isinstance(value, int) and not isinstance(value, bool) and (value >= least or (unset and value == UNSET)):
      continue
    meaning = f', or {UNSET} to {unset}' if unset else ''
    raise ConfigError(f'config.{field} must be an integer >= {least}{meaning}; got {value!r}.')


def _t_inv_values(t_inv):
  return t_inv.values() if hasattr(t_inv, 'values') else [t_inv]


def _watchdog(config) -> None:
  """Timeouts and grace periods are numbers >= 0 (0: no limit)."""
  dog = config.get('watchdog')
  if dog is None:
    return
  for name, value in dog.items():
    if name == 'enabled':
      if not isinstance(value, bool):
        raise ConfigError(f'config.watchdog.enabled must be True or False, got {value!r}.')
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f'config.watchdog.{name} must be a number >= 0 (0: no limit), got {value!r}.')


def validate(config, *, device_count: int, process_count: int = 1) -> None:
  """Raises :class:`ConfigError` for the first impossible setting of ``config``."""
  if config.model.name not in models.names():
    raise ConfigError(f'Unknown model {config.model.name!r} (config.model.name); known: {", ".join(models.names())}.')
  if config.method not in METHODS:
    raise ConfigError(f'Unknown method {config.method!r} (config.method); choose one of {METHODS}.')
  if config.optimizer.name not in OPTIMIZERS:
    raise ConfigError(f'Unknown optimizer {config.optimizer.name!r} (config.optimizer.name); choose one of {OPTIMIZERS}.')
  if config.compute_dtype not in DTYPES:
    raise ConfigError(f'config.compute_dtype must be one of {DTYPES}, got {config.compute_dtype!r}.')
  _positive(config, 'batch_size', 'eval_batch_size', 'grad_accum_steps', 'optimizer.lr')
  if config.optimizer.name == 'paper_sgd':
    _positive(config, 'optimizer.lr_conv')
    if config.optimizer.wd_conv < 0:
      raise ConfigError(f'config.optimizer.wd_conv must be >= 0, got {config.optimizer.wd_conv!r}.')
  if config.num_train_steps == 0 or (config.num_train_steps == UNSET and not config.num_epochs > 0):
    raise ConfigError(f'Nothing to train: set config.num_train_steps > 0 or config.num_epochs > 0 '
                      f'(got {config.num_train_steps} and {config.num_epochs}).')
  _step_counts(config)
  _watchdog(config)
  for name in ('batch_size', 'eval_batch_size'):
    size = config[name]
    if size % device_count:
      raise ConfigError(f'config.{name}={size} is not divisible by the {device_count} devices: '
                        f'use a multiple of {device_count}.')
    if size % process_count:
      raise ConfigError(f'config.{name}={size} is not divisible by the {process_count} processes.')
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f'config.batch_size={config.batch_size} must split into '
                      f'config.grad_accum_steps={config.grad_accum_steps} equal micro-batches.')
  if (config.batch_size // config.grad_accum_steps) % device_count:
    raise ConfigError(f'Each micro-batch ({config.batch_size}/{config.grad_accum_steps}) must be divisible '
                      f'by the {device_count} devices: change config.batch_size or config.grad_accum_steps.')
  if config.method == 'hebbian':
    _validate_hebbian(config, device_count)
  if config.method == 'ghl':
    if config.ghl.rule not in rules.RULES:
      raise ConfigError(f'Unknown Hebbian rule {config.ghl.rule!r} (config.ghl.rule); choose one of {sorted(rules.RULES)}.')
    for value in _t_inv_values(config.ghl.t_inv):
      if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f'config.ghl.t_inv values must be > 0, got {value!r}.')
    if config.ghl.direction not in transform.DIRECTIONS:
      raise ConfigError(f'config.ghl.direction must be one of {transform.DIRECTIONS}, got {config.ghl.direction!r}.')
    if config.ghl.magnitude not in transform.MAGNITUDES:
      raise ConfigError(f'config.ghl.magnitude must be one of {transform.MAGNITUDES}, got {config.ghl.magnitude!r}.')
    rule_of(config, 'ghl')


def rule_of(config, section: str = 'ghl') -> Rule:
  """The :class:`ghl_jax.Rule` of ``config.ghl`` (or ``config.hebbian``): the one source of the
  rule's settings for the optimizer, the train step and the baselines."""
  settings = config[section]
  try:
    return Rule(settings.rule, t_inv=plain(settings.t_inv), layers=settings.layers,
                per_head=settings.get('per_head', False), **dict(settings.rule_kwargs))
  except ValueError as error:
    raise ConfigError(f'config.{section}: {error}') from None


def plain(value):
  """A float, or a per-layer ConfigDict as a plain dict."""
  return dict(value) if hasattr(value, 'items') else value


def _validate_hebbian(config, device_count: int) -> None:
  """Method 'hebbian': the rule and phase-1 settings in ``config.hebbian`` and a BP probe optimizer."""
  h = config.hebbian
  if h.rule not in rules.RULES:
    raise ConfigError(f'Unknown Hebbian rule {h.rule!r} (config.hebbian.rule); choose one of {sorted(rules.RULES)}.')
  for field in ('t_inv', 'lr'):
    for value in _t_inv_values(h[field]):
      if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f'config.hebbian.{field} values must be > 0, got {value!r}.')
  rule_of(config, 'hebbian')
  if h.norm_power is not None and not h.norm_power >= 0:
    raise ConfigError(f'config.hebbian.norm_power must be >= 0 or None, got {h.norm_power!r}.')
  if h.num_steps == UNSET and not h.epochs > 0:
    raise ConfigError(f'config.hebbian.epochs must be > 0 (or set config.hebbian.num_steps >= 0), got {h.epochs!r}.')
  if not (isinstance(h.batch_size, int) and h.batch_size > 0) or h.batch_size % device_count:
    raise ConfigError(f'config.hebbian.batch_size={h.batch_size!r} must be a positive multiple of the '
                      f'{device_count} devices.')
  if h.probe_schedule not in ('cosine', 'halving'):
    raise ConfigError(f"config.hebbian.probe_schedule must be 'cosine' or 'halving', got {h.probe_schedule!r}.")
  if config.optimizer.name == 'paper_sgd' or (h.probe_schedule == 'halving' and config.optimizer.name != 'adam'):
    raise ConfigError(f'The probe of method hebbian trains with config.optimizer.name=momentum_sgd or adam '
                      f'(adam for probe_schedule=halving), got {config.optimizer.name!r}.')


def check_workdir(workdir: str) -> None:
  """The workdir exists (or can be created) and is writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ConfigError(f'Cannot create --workdir {workdir}: {error.strerror}; choose a writable directory.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir {workdir} is not writable; choose a writable directory.')
