"""Purely local (unsupervised) Hebbian training and the linear probe that follows it.

The baselines SoftHebb, SWTA-FH and HPCA-FH train their feature layers with a local rule and no
feedback, then train a classifier on the frozen features. Two optax transformations do that:

* :func:`hebbian_ascent` — for every selected kernel ``W`` with raw local term ``H`` (a rule of
  :mod:`ghl_jax.rules`; ``Ĥ = H / (max|H| + 1e-30)`` per layer)::

      W_k ← W_k + η_k Ĥ_k,     η_k = η_layer                                  (plain)
                               η_k = η_layer · (|‖W_k‖₂ − 1| + 1e-10)^p       (``norm_power=p``)

  the second being SoftHebb's weight-norm-dependent rate: a neuron whose weights reach unit norm
  stops learning. Every other leaf gets a zero update.
* :func:`probe_only` — the given optimizer on the params matching a regex (the classifier), zero
  updates elsewhere; :func:`frozen_features` runs the frozen part of a model with its BatchNorm
  running averages, so its outputs and statistics do not change while the probe trains, and
  :func:`probe_split` evaluates the probe on those outputs computed once.

:func:`two_phase` keeps both optimizer states in one, so one train state and one checkpoint
cover both phases.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ghl_jax import adapters
from ghl_jax import transform
from ghl_jax import trees
from ghl_jax.rule import Layers, Rule, TInv, per_layer

Rate = Union[float, Mapping[str, float]]
NORM_EPS = 1e-10
# SoftHebb's probe halves its learning rate at these fractions of training.
HALVING_FRACTIONS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)


def _flat_all(tree) -> dict:
  return trees.flat(tree, keep_empty_nodes=True)


def neuron_norms(kernel: jax.Array, stacked: int = 0) -> jax.Array:
  """``‖W_k‖₂`` of every output neuron ``k`` (over all kernel axes but the last and the
  ``stacked`` leading ones), with ``keepdims`` so it broadcasts against the kernel."""
  axes = tuple(range(stacked, kernel.ndim - 1))
  return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=axes, keepdims=True))


def norm_dependent_rate(kernel: jax.Array, power: float, stacked: int = 0) -> jax.Array:
  """SoftHebb's per-neuron factor ``(|‖W_k‖₂ − 1| + 1e-10)^power`` (0 at unit norm)."""
  return (jnp.abs(neuron_norms(kernel, stacked) - 1.0) + NORM_EPS) ** power


def _check_rates(lr: Rate) -> None:
  values = lr.items() if isinstance(lr, Mapping) else ((None, lr),)
  for path, value in values:
    if not float(value) > 0:
      where = f' for {path!r}' if path is not None else ''
      raise ValueError(f'hebbian_ascent lr must be > 0, got {value!r}{where}.')


class HebbianAscentState(NamedTuple):
  """hebbian_ascent() keeps no state."""


def hebbian_ascent(lr: Rate, *, rule: Union[Rule, str, Callable] = 'softhebb', layers: Layers = None,
                   t_inv: TInv = 1.0, rule_kwargs: Optional[dict] = None,
                   norm_power: Optional[float] = None, axis_name: Optional[str] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """Unsupervised Hebbian training: ``W_k ← W_k + η_k Ĥ_k`` on every selected kernel.

  Args:
    lr: the layer rate ``η_layer``, a float or a mapping from module path/regex to float; a
      selected layer the mapping does not cover is an error.
    rule: a :class:`~ghl_jax.Rule` (``Rule('softhebb', t_inv=..., layers=...)``), or (v1) the
      name of a rule of :mod:`ghl_jax.rules` (``'softhebb'``, ``'swta'``, ``'hpca'``, ...) or a
      callable with the same signature, with ``layers``, ``t_inv`` and ``rule_kwargs`` beside it
      (``layers=None``: every nn.Conv kernel).
    norm_power: ``p`` of SoftHebb's per-neuron rate ``η_layer (|‖W_k‖₂ − 1| + 1e-10)^p``
      (computed from the weights before the step); ``None`` for a constant rate.
    axis_name: inside ``pmap``/``shard_map``, raw terms are summed over this axis first.

  ``update(updates, state, params, *, taps=...)`` or ``(..., hebb=hebbian_terms(...))``; the
  incoming ``updates`` only give the tree (their values are ignored): this is ascent along the
  local term, not a modification of a gradient. Updates are meant to be added (optax).
  """
  _check_rates(lr)
  if norm_power is not None and not float(norm_power) >= 0:
    raise ValueError(f'hebbian_ascent norm_power must be >= 0 or None, got {norm_power!r}.')
  rule = Rule.of(rule, t_inv=t_inv, layers=layers, rule_kwargs=rule_kwargs)

  def init(params):
    del params
    return HebbianAscentState()

  def update(updates, state, params=None, *, taps=None, hebb=None, **extra):
    del extra
    if params is None:
      raise ValueError('hebbian_ascent needs params: call tx.update(updates, state, params, taps=...).')
    if hebb is None:
      if taps is None:
        raise ValueError('hebbian_ascent needs taps=ghl_jax.tap(apply)(...)[1] or '
                         'hebb=hebbian_terms(...) in tx.update.')
      hebb = transform.hebbian_terms(params, taps, rule=rule)
    if axis_name is not None:
      hebb = jax.lax.psum(hebb, axis_name)
    flat = {path: jnp.zeros_like(u) if hasattr(u, 'shape') else u   # MaskedNode, empty nodes
            for path, u in _flat_all(updates).items()}
    kernels = _flat_all(params)
    for path, term in hebb.items():
      if path not in flat or isinstance(flat[path], optax.MaskedNode):
        continue
      rate = per_layer(path, lr)
      if rate is None:
        raise ValueError(f'hebbian_ascent lr={dict(lr)!r} gives no rate for {path!r}; add its module '
                         'path (or a regex matching it) to the mapping.')
      if norm_power is not None:
        rate = rate * norm_dependent_rate(kernels[path], norm_power, term.stacked)
      flat[path] = (rate * term.normalized()).astype(flat[path].dtype)
    return trees.unflat_like(updates, flat), state

  return optax.GradientTransformationExtraArgs(init, update)


def _matches(trainable: str, path: str) -> bool:
  return re.search(trainable, path) is not None


def trainable_labels(trainable: str) -> Callable[[Any], Any]:
  """Label fn for ``optax.multi_transform``: ``'probe'`` where the regex ``trainable`` is found in
  the '/'-joined param path, ``'frozen'`` elsewhere."""
  def labels(params):
    flat = _flat_all(params)
    chosen = {p for p in flat if _matches(trainable, p)}
    if not chosen:
      raise ValueError(f'The probe regex {trainable!r} matches no parameter; params are {sorted(flat)}.')
    return trees.unflat_like(params, {p: 'probe' if p in chosen else 'frozen' for p in flat})
  return labels


def probe_only(tx: optax.GradientTransformation, trainable: str = r'classifier'
               ) -> optax.GradientTransformationExtraArgs:
  """``tx`` on the params whose '/'-joined path matches the regex ``trainable``; zero updates
  (and no optimizer state) for every other param."""
  return optax.multi_transform({'probe': tx, 'frozen': optax.set_to_zero()},
                               trainable_labels(trainable), mask_compatible_extra_args=True)


def stop_frozen(params, trainable: str):
  """``params`` with ``stop_gradient`` on every leaf the regex ``trainable`` does not match, so
  backprop never runs through the frozen part."""
  flat = {p: v if _matches(trainable, p) else jax.lax.stop_gradient(v)
          for p, v in _flat_all(params).items()}
  return trees.unflat_like(params, flat)


def frozen_features(apply: Callable, trainable: str) -> Callable:
  """Wraps ``apply`` (e.g. ``model.apply``) so that every ``nn.BatchNorm`` whose statistics path
  (``'<module path>/mean'``) the regex ``trainable`` does not match normalises with its running
  averages and leaves them unchanged, even with ``train=True``. Dropout and the trainable
  BatchNorms behave as usual."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == '__call__' and adapters.is_batch_norm(module)
        and module.use_running_average is False
        and not _matches(trainable, '/'.join(module.path + ('mean',)))):
      frozen = module.clone(parent=None, use_running_average=True)
      return frozen.apply(module.variables, *args, **kwargs)
    return next_fun(*args, **kwargs)

  def wrapped(*args, **kwargs):
    with nn.intercept_methods(intercept):
      return apply(*args, **kwargs)
  return wrapped


def _holds_trainable(module, trainable: str) -> bool:
  """Whether a variable of ``module`` (or of its submodules) has a path the regex ``trainable``
  matches: its params as in :func:`probe_only`, its BatchNorm statistics as in
  :func:`frozen_features`."""
  variables = {c: module.variables[c] for c in ('params', 'batch_stats') if c in module.variables}
  return any(_matches(trainable, '/'.join(module.path + key[1:]))
             for key in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)))


def probe_split(apply: Callable, trainable: str) -> tuple[Callable, Callable]:
  """``(features, head)`` of ``apply`` (e.g. ``model.apply``) at the probe: the first module called
  that holds a variable the regex ``trainable`` matches (the paths :func:`probe_only` trains).

  ``features(*args, **kwargs)`` is that module's input ``z = f_frozen(x)``; ``head(z, *args,
  **kwargs)`` is ``apply``'s output with the module's input replaced by ``z``. Under ``jax.jit`` the
  frozen layers before it then compute nothing that is used, so XLA drops them: a probe is evaluated
  on features computed once. Exact for networks whose output depends on the input only through
  ``z`` (a sequential stack before the probe); check ``head(features(x), x) == apply(x)``."""
  def hooked(replacement):
    seen = {}

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if (seen or context.method_name != '__call__' or not module.path
          or not _holds_trainable(module, trainable)):
        return next_fun(*args, **kwargs)
      if not args:
        raise ValueError(f'the probe module {"/".join(module.path)} takes its input by keyword; '
                         'probe_split needs it passed positionally.')
      seen['input'] = args[0]
      if replacement is not None:
        args = (replacement,) + tuple(args[1:])
      return next_fun(*args, **kwargs)
    return seen, intercept

  def run(replacement, args, kwargs):
    seen, intercept = hooked(replacement)
    with nn.intercept_methods(intercept):
      out = apply(*args, **kwargs)
    if not seen:
      raise ValueError(f'trainable={trainable!r} matches no variable of a module the model calls; '
                       "give the regex of the probe's params (e.g. '^classifier/').")
    return seen['input'], out

  def features(*args, **kwargs):
    return run(None, args, kwargs)[0]

  def head(z, *args, **kwargs):
    return run(z, args, kwargs)[1]
  return features, head


def halving_schedule(lr: float, total_steps: int,
                     fractions=HALVING_FRACTIONS) -> optax.Schedule:
  """SoftHebb's probe schedule: ``lr`` halved at each of ``fractions`` of ``total_steps``
  (boundaries that coincide on short runs multiply)."""
  if not lr > 0:
    raise ValueError(f'learning rates must be > 0, got {lr}.')
  if not total_steps > 0:
    raise ValueError(f'total_steps must be > 0, got {total_steps}.')
  scales = {}
  for fraction in fractions:
    boundary = int(fraction * total_steps)
    scales[boundary] = scales.get(boundary, 1.0) * 0.5
  return optax.piecewise_constant_schedule(lr, scales)


def halving_adam(*, lr: float = 1e-3, total_steps: int, weight_decay: float = 0.0
                 ) -> optax.GradientTransformation:
  """Adam(W) with :func:`halving_schedule`: SoftHebb's linear-probe optimizer."""
  return optax.adamw(halving_schedule(lr, total_steps), weight_decay=weight_decay)


class TwoPhaseState(NamedTuple):
  hebbian: Any
  probe: Any


def two_phase(hebbian_tx: optax.GradientTransformation, probe_tx: optax.GradientTransformation
              ) -> optax.GradientTransformationExtraArgs:
  """One optimizer for Hebbian training followed by a probe: the state holds both.

  ``update(..., hebb=...)`` (or ``taps=...``) is a Hebbian step by ``hebbian_tx``; an update
  without Hebbian terms is a probe step by ``probe_tx`` on the gradients.
  """
  def init(params):
    return TwoPhaseState(hebbian_tx.init(params), probe_tx.init(params))

  def update(updates, state, params=None, *, hebb=None, taps=None, **extra):
    del extra
    if hebb is not None or taps is not None:
      updates, inner = hebbian_tx.update(updates, state.hebbian, params, hebb=hebb, taps=taps)
      return updates, state._replace(hebbian=inner)
    updates, inner = probe_tx.update(updates, state.probe, params)
    return updates, state._replace(probe=inner)

  return optax.GradientTransformationExtraArgs(init, update)
