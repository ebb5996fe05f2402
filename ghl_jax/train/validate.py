"""Config checks run before anything is built: each bad value gives one line saying what to change."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ghl_jax import models
from ghl_jax import rules
from ghl_jax import transform
from ghl_jax.rule import Rule

METHODS = ('ghl', 'bp', 'hebbian')
OPTIMIZERS = ('paper_sgd', 'momentum_sgd', 'adam')
DTYPES = ('float32', 'bfloat16', 'auto')

UNSET = -1   # the one 'not set' value of a step count (what it means is in RANGES)


@dataclasses.dataclass(frozen=True)
class Range:
  """The valid values of one numeric config field: an integer (``integer``) or any number, at least
  ``least`` or above ``above``, below ``below``; ``special`` lists the values outside that range
  that mean something on purpose, as ``(value, meaning)``."""
  integer: bool
  least: Optional[float] = None
  above: Optional[float] = None
  below: Optional[float] = None
  special: tuple = ()
  zero: str = ''         # where 0 is allowed on purpose: what it means (said in the error line)

  def allows(self, value) -> bool:
    if any(value == v and type(value) is type(v) for v, _ in self.special):
      return True
    if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
      return False
    return ((self.least is None or value >= self.least) and (self.above is None or value > self.above)
            and (self.below is None or value < self.below))

  def describe(self) -> str:
    bounds = [f'>= {self.least:g}' if self.least is not None else '', f'> {self.above:g}' if self.above is not None else '',
              f'< {self.below:g}' if self.below is not None else '']
    text = ('an integer ' if self.integer else 'a number ') + ' and '.join(b for b in bounds if b)
    text += ''.join(f', or {v} to {meaning}' for v, meaning in self.special)
    return text + (f' (0: {self.zero})' if self.zero else '')


COUNT, POSITIVE, NONNEGATIVE = Range(True, least=1), Range(False, above=0), Range(False, least=0)
NO_LIMIT = Range(False, least=0, zero='no limit')


def steps_or_unset(meaning: str) -> Range:
  """A step count >= 1, or :data:`UNSET` meaning ``meaning``."""
  return Range(True, least=1, special=((UNSET, meaning),))


# Every numeric field of experiments/configs/common.base(): its valid values (one source of truth;
# tests/test_fault_tolerance.py checks that each field of base() is here). Per-layer mappings (t_inv,
# hebbian.lr) check each value. config.model.kwargs: ghl_jax.models.check_kwargs.
RANGES = {
    'seed': Range(True, least=0),
    'batch_size': COUNT, 'eval_batch_size': COUNT, 'grad_accum_steps': COUNT,
    'num_train_steps': steps_or_unset('train config.num_epochs epochs'),
    'num_epochs': POSITIVE,
    'steps_per_epoch': steps_or_unset('take it from the dataset size'),
    'eval_every_steps': steps_or_unset('evaluate once per epoch'),
    'log_every_steps': COUNT, 'checkpoint_every_steps': COUNT, 'keep_checkpoints': COUNT,
    'data.image_size': Range(True, least=1, special=((None, "keep the dataset's image size"),)),
    'optimizer.lr': POSITIVE, 'optimizer.lr_conv': POSITIVE, 'optimizer.wd_conv': NONNEGATIVE,
    'optimizer.momentum': Range(False, least=0, below=1), 'optimizer.weight_decay': NONNEGATIVE,
    'optimizer.warmup_steps': Range(True, least=0, zero='no warm-up'),
    'ghl.t_inv': POSITIVE,
    'hebbian.t_inv': POSITIVE, 'hebbian.lr': POSITIVE,
    'hebbian.norm_power': Range(False, least=0, special=((None, 'keep the rate constant'),)),
    'hebbian.epochs': POSITIVE,
    'hebbian.num_steps': Range(True, least=0, special=((UNSET, 'train config.hebbian.epochs epochs'),),
                               zero='no Hebbian phase'),
    'hebbian.batch_size': COUNT,
    **{f'watchdog.{phase}_s': NO_LIMIT for phase in ('startup', 'restore', 'step', 'eval', 'save')},
    'watchdog.step_factor': Range(False, least=0, zero='no scaling'),
    'watchdog.sigterm_grace_s': Range(False, least=0, zero='wait for the save'),
    'watchdog.heartbeat_s': Range(True, least=1), 'watchdog.shutdown_s': Range(True, least=1),
}
class ConfigError(ValueError):
  """A config value that cannot run; the message says which field to change and how."""


def _field(config, dotted: str):
  """``config.a.b`` for ``'a.b'`` (KeyError when a section or field is absent)."""
  for key in dotted.split('.'):
    config = config[key]
  return config


def _ranges(config) -> None:
  """Each field of :data:`RANGES` present in ``config`` holds a value in its range."""
  for field, valid in RANGES.items():
    try:
      value = _field(config, field)
    except (KeyError, AttributeError):
      continue
    for one in (value.values() if hasattr(value, 'values') else [value]):
      if not valid.allows(one):
        raise ConfigError(f'config.{field} must be {valid.describe()}; got {one!r}.')


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
  if config.num_train_steps == 0 or (config.num_train_steps == UNSET and config.num_epochs == 0):
    raise ConfigError(f'Nothing to train: set config.num_train_steps > 0 or config.num_epochs > 0 '
                      f'(got {config.num_train_steps} and {config.num_epochs}).')
  _ranges(config)
  try:
    models.check_kwargs(config.model.name, dict(config.model.kwargs))
  except ValueError as error:
    raise ConfigError(f'config.model.kwargs does not fit {config.model.name}: {error}') from None
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
  shadow = config.ghl.get('shadow', False)
  if not isinstance(shadow, bool):
    raise ConfigError(f'config.ghl.shadow must be True or False, got {shadow!r}.')
  if shadow and config.method != 'bp':
    raise ConfigError(f'config.ghl.shadow shows what GHL would do in a BP run (method bp), not in method '
                      f'{config.method!r}: a GHL run logs the alignment of the update it applies. Set it False.')
  if config.method == 'hebbian':
    _validate_hebbian(config, device_count)
  if config.method == 'ghl':
    if config.ghl.rule not in rules.RULES:
      raise ConfigError(f'Unknown Hebbian rule {config.ghl.rule!r} (config.ghl.rule); choose one of {sorted(rules.RULES)}.')
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
  rule_of(config, 'hebbian')
  if h.batch_size % device_count:
    raise ConfigError(f'config.hebbian.batch_size={h.batch_size!r} must be a positive multiple of the '
                      f'{device_count} devices.')
  if h.probe_schedule not in ('cosine', 'halving'):
    raise ConfigError(f"config.hebbian.probe_schedule must be 'cosine' or 'halving', got {h.probe_schedule!r}.")
  if config.optimizer.name == 'paper_sgd' or (h.probe_schedule == 'halving' and config.optimizer.name != 'adam'):
    raise ConfigError(f'The probe of method hebbian trains with config.optimizer.name=momentum_sgd or adam '
                      f'(adam for probe_schedule=halving), got {config.optimizer.name!r}.')
