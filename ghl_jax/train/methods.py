"""Training methods as phases: what each method runs, at which batch size, for how many steps.

    ghl       [ghl: GHL train step, batch_size, all steps]
    bp        [bp: backprop train step, batch_size, all steps]
    hebbian   [hebbian: unsupervised step, hebbian.batch_size, first steps]
              [probe: backprop on config.hebbian.trainable only, batch_size, the rest]

One optimizer covers the whole run (the Hebbian baselines keep both phases' states in one, see
:func:`ghl_jax.hebbian.two_phase`), so one train state and one checkpoint cover every phase. The
loop (:mod:`ghl_jax.train.loop`) runs the phases in turn and never asks for the method.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import optax

from ghl_jax import accel
from ghl_jax import hebbian as hebbian_lib
from ghl_jax import optim
from ghl_jax import selection as selection_lib
from ghl_jax import transform
from ghl_jax.rule import Rule
from ghl_jax.train import steps as steps_lib
from ghl_jax.train import validate


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps ``[start, stop)`` of a run: ``step_fn(state, batch) -> (state, metrics)`` (not yet
  jitted) on batches of ``batch_size``, whose data stream starts at the phase's first step;
  ``evaluates``: evaluation every ``eval_every`` steps of the phase and at its end; ``probe``: the
  regex of the params a linear-probe phase trains (the network before them frozen), so that its
  evaluations reuse the eval split's features (:class:`ghl_jax.train.evaluation.ProbeEvaluation`)."""
  name: str
  step_fn: Callable
  batch_size: int
  start: int
  stop: int
  evaluates: bool = True
  probe: Optional[str] = None


def selection_of(model, sample, rule: Rule, section: str = 'ghl') -> selection_lib.Selection:
  """What ``rule`` governs in ``model`` (:func:`ghl_jax.selection.of_model`: one abstract trace); its
  errors name the config section."""
  try:
    return selection_lib.of_model(rule, model, sample, train=False)
  except ValueError as error:
    raise validate.ConfigError(f'config.{section}: {error}') from None


def budget(config, num_train_examples: int) -> tuple[int, int, int]:
  """``(num_train_steps, steps_per_epoch, unsupervised steps)`` from the config and the dataset size
  (the last is 0 but for method 'hebbian')."""
  per_epoch = (config.steps_per_epoch if config.steps_per_epoch != validate.UNSET
               else num_train_examples // config.batch_size)
  if per_epoch <= 0:
    raise validate.ConfigError(f'config.batch_size={config.batch_size} exceeds the {num_train_examples} '
                               'training examples; lower it.')
  first = hebbian_steps(config, num_train_examples)
  steps = (config.num_train_steps if config.num_train_steps != validate.UNSET
           else first + int(config.num_epochs * per_epoch))
  if config.method == 'hebbian' and steps <= first:
    raise validate.ConfigError(f'{steps} steps in all leave none for the probe after the {first} Hebbian '
                               'steps: raise config.num_train_steps or lower config.hebbian.num_steps/epochs.')
  return steps, per_epoch, first


def hebbian_steps(config, num_train_examples: int) -> int:
  """Steps of the unsupervised phase of method 'hebbian' (0 for the other methods):
  ``config.hebbian.num_steps`` if set, else ``epochs`` passes at ``config.hebbian.batch_size``."""
  if config.method != 'hebbian':
    return 0
  h = config.hebbian
  if h.num_steps != validate.UNSET:
    return int(h.num_steps)
  examples = (config.steps_per_epoch * config.batch_size if config.steps_per_epoch != validate.UNSET
              else num_train_examples)
  return int(h.epochs * (examples // h.batch_size))


def base_optimizer(o, total: int):
  """The backprop optimizer ``config.optimizer`` names (momentum SGD or Adam) over ``total`` steps."""
  if o.name == 'momentum_sgd':
    return optim.momentum_sgd(lr=o.lr, total_steps=total, momentum=o.momentum,
                              weight_decay=o.weight_decay, nesterov=o.nesterov, warmup_steps=o.warmup_steps)
  return optim.adam(lr=o.lr, total_steps=total, weight_decay=o.weight_decay)


def supervised_optimizer(config, total: int, rule: Optional[Rule], kernels) -> tuple:
  """``(tx, lr_fns)`` of methods 'ghl' (``rule`` given) and 'bp' (``rule=None``): the paper's
  two groups (``kernels``, the selection's paths, the GHL group) or ``config.optimizer`` with GHL
  chained before it."""
  o = config.optimizer
  ghl_args = dict(direction=config.ghl.direction, magnitude=config.ghl.magnitude)
  if o.name == 'paper_sgd':
    tx = optim.paper_sgd(lr=o.lr, lr_conv=o.lr_conv, wd_conv=o.wd_conv, total_steps=total,
                         kernels=kernels, use_ghl=rule is not None,
                         **(dict(ghl_args, rule=rule) if rule is not None else {}))
    return tx, {'ghl': optim.cosine(o.lr_conv, total), 'other': optim.cosine(o.lr, total)}
  base = base_optimizer(o, total)
  tx = optax.chain(transform.ghl(rule=rule, **ghl_args), base) if rule is not None else base
  return tx, {'all': optim.cosine(o.lr, total)}


def hebbian_optimizer(config, total: int, rule: Rule, first: int) -> tuple:
  """``(tx, lr_fns)`` of method 'hebbian': ascent along ``rule``'s terms for the first ``first``
  steps, then ``config.optimizer`` on the params matching ``config.hebbian.trainable`` (the
  probe; the rest frozen) for the remaining ``total - first`` steps."""
  h, o = config.hebbian, config.optimizer
  probe_steps = total - first
  if h.probe_schedule == 'halving':
    probe = hebbian_lib.halving_adam(lr=o.lr, total_steps=probe_steps, weight_decay=o.weight_decay)
    schedule = hebbian_lib.halving_schedule(o.lr, probe_steps)
  else:
    probe, schedule = base_optimizer(o, probe_steps), optim.cosine(o.lr, probe_steps)
  ascent = hebbian_lib.hebbian_ascent(validate.plain(h.lr), rule=rule, norm_power=h.norm_power)
  tx = hebbian_lib.two_phase(ascent, hebbian_lib.probe_only(probe, h.trainable))
  return tx, {'probe': lambda step: schedule(step - first)}


def phases(config, model, sample, total: int, first: int) -> tuple[optax.GradientTransformation, list, selection_lib.Selection]:
  """``(tx, [Phase, ...], selection)`` of ``config.method`` over ``total`` steps (``first`` of them
  unsupervised for method 'hebbian'); ``selection``: what the rule governs, decided here once (the
  BP baseline trains the same kernels as its paper-recipe group, and gets ``None``: GHL governs nothing)."""
  impl = accel.resolve(config.get('conv_impl', 'auto'))      # resolved once for every step of the run
  accum, log_every = config.grad_accum_steps, config.log_every_steps
  section = 'hebbian' if config.method == 'hebbian' else 'ghl'
  selection = selection_of(model, sample, validate.rule_of(config, section), section)
  rule = selection.rule.replace(layers=selection.rule_paths)
  if config.method == 'hebbian':
    tx, lr_fns = hebbian_optimizer(config, total, rule, first)
    probe = steps_lib.make_train_step(model, tx, rule=None, accum_steps=accum, lr_fns=lr_fns,
                                      trainable=config.hebbian.trainable, conv_impl=impl, log_every=log_every)
    return tx, [Phase('hebbian', steps_lib.make_hebbian_step(model, tx, rule=rule, log_every=log_every),
                      config.hebbian.batch_size, 0, first, evaluates=False),
                Phase('probe', probe, config.batch_size, first, total, probe=config.hebbian.trainable)], selection
  use = rule if config.method == 'ghl' else None
  shadow = rule if config.method == 'bp' and config.ghl.get('shadow', False) else None
  if shadow is not None and jax.process_index() == 0:
    print(f'BP run: at each log step, also what GHL would have done on {", ".join(selection.paths)} '
          '(align/<layer>/*, config.ghl.shadow).', flush=True)
  tx, lr_fns = supervised_optimizer(config, total, use, selection.paths)
  step = steps_lib.make_train_step(model, tx, rule=use, accum_steps=accum, lr_fns=lr_fns, conv_impl=impl,
                                   log_every=log_every, shadow=shadow)
  # The BP baseline trains the same two groups by backprop: no GHL table in its summary.
  return tx, [Phase(config.method, step, config.batch_size, 0, total)], selection if use is not None else None
