"""Optimizers: the paper's two-group SGD around ``ghl()``, and end-to-end BP baselines.

The paper (authors' code) trains with ``torch.optim.SGD`` without momentum and two groups:

    GHL kernels:   W ← W − η_conv(t) · (sign(G) ⊙ |Ĥ| + λ_conv W)
    everything else:   θ ← θ − η(t) · G

with ``η(t) = η₀ · ½(1 + cos(π t / T))`` stepped every iteration down to 0.
"""
from __future__ import annotations

import re
from typing import Collection, Optional, Union

import flax
import optax

from ghl_jax import trees
from ghl_jax.rule import Rule
from ghl_jax.selection import Selection
from ghl_jax.transform import ghl

DEFAULT_GHL_KERNELS = r'(?i)conv[^/]*/kernel$'


Kernels = Union[str, Collection[str], Selection]


def group_labels(kernels: Kernels):
  """Label fn for ``optax.multi_transform``: ``'ghl'`` for the given kernels, ``'bp'`` otherwise.

  ``kernels`` is a :class:`~ghl_jax.selection.Selection` (its governed kernels), a regex over
  '/'-joined param paths or a collection of exact paths.
  """
  if isinstance(kernels, Selection):
    kernels = kernels.paths

  def labels(params):
    _, keys = trees.flat_paths(params, keep_empty_nodes=False)
    chosen = {p for p in keys if (re.search(kernels, p) if isinstance(kernels, str) else p in kernels)}
    if not chosen:
      raise ValueError(f'No parameter matches the GHL kernels {kernels!r}; params are {sorted(keys)}.')
    if not isinstance(kernels, str) and len(chosen) < len(set(kernels)):
      raise ValueError(f'GHL kernels {sorted(set(kernels) - chosen)} are not params; params are {sorted(keys)}.')
    return trees.like(params, flax.traverse_util.unflatten_dict(
        {key: 'ghl' if p in chosen else 'bp' for p, key in keys.items()}))
  return labels


def cosine(peak: float, total_steps: int) -> optax.Schedule:
  """``η(t) = peak · ½(1 + cos(π t / T))``, reaching 0 at ``T = total_steps``."""
  if not peak > 0:
    raise ValueError(f'learning rates must be > 0, got {peak}.')
  if not total_steps > 0:
    raise ValueError(f'total_steps must be > 0, got {total_steps}.')
  return optax.cosine_decay_schedule(peak, total_steps)


def paper_sgd(*, lr: float, lr_conv: float, wd_conv: float, total_steps: int,
              kernels: Kernels = DEFAULT_GHL_KERNELS, use_ghl: bool = True,
              rule: Optional[Rule] = None, **ghl_kwargs) -> optax.GradientTransformationExtraArgs:
  """The paper's optimizer: GHL (or BP) on ``kernels`` with decay, plain SGD elsewhere.

  ``kernels`` names the GHL group: a :class:`~ghl_jax.selection.Selection` (what the rule governs:
  ``grad_fn.selection(...)``, ``ghl_jax.selection.of_model``), a regex or exact '/'-joined paths; by
  default, as in the paper's code, every kernel whose module name contains "conv" (a Hebbian term
  for a kernel outside the group is an error at the first update). ``rule`` (a
  :class:`~ghl_jax.Rule`; left out, ``ghl()`` takes the terms' own) and ``ghl_kwargs``
  (``direction``, ``magnitude``, ``axis_name``) go to :func:`ghl_jax.ghl`. With
  ``use_ghl=False`` the same groups train by plain backprop (the paper-recipe BP baseline).
  """
  if wd_conv < 0:
    raise ValueError(f'wd_conv must be >= 0, got {wd_conv}.')
  if not use_ghl and (rule is not None or ghl_kwargs):
    raise ValueError(f'paper_sgd(use_ghl=False) trains by backprop and would ignore '
                     f'{["rule"] * (rule is not None) + sorted(ghl_kwargs)}: drop them, or use_ghl=True.')
  ghl_group = [optax.add_decayed_weights(wd_conv), optax.sgd(cosine(lr_conv, total_steps))]
  if use_ghl:
    v1 = {'t_inv', 'layers', 'rule_kwargs'} & set(ghl_kwargs)
    if rule is None and v1 and not isinstance(kernels, Selection):
      ghl_kwargs.setdefault('layers', kernels)
    ghl_kwargs['rule'] = rule if rule is not None else ghl_kwargs.get('rule')
    ghl_group.insert(0, ghl(**ghl_kwargs))
  return optax.multi_transform(
      {'ghl': optax.chain(*ghl_group), 'bp': optax.sgd(cosine(lr, total_steps))},
      group_labels(kernels), mask_compatible_extra_args=True)


def momentum_sgd(*, lr: float, total_steps: int, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = True, warmup_steps: int = 0) -> optax.GradientTransformation:
  """A standard strong BP recipe: SGD with (Nesterov) momentum, coupled L2 decay, cosine schedule."""
  if warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps)
  else:
    schedule = cosine(lr, total_steps)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum, nesterov=nesterov))


def adam(*, lr: float, total_steps: int, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AdamW with a cosine schedule (BP baseline)."""
  return optax.adamw(cosine(lr, total_steps), weight_decay=weight_decay)
