"""``ghl()``: the optax transformation that gives each selected kernel GHL's update.

For every selected kernel ``W`` with backprop gradient ``G`` and raw local term ``H`` (a rule
of :mod:`ghl_jax.rules` evaluated on the layer's taps)::

    Ĥ = H / (max|H| + 1e-30)            (per layer; per block for nn.scan-stacked kernels)
    G ← sign(G) ⊙ |Ĥ|                   (direction from the task, magnitude from plasticity)

Every other leaf passes through unchanged. Chain it before weight decay and SGD (see
:mod:`ghl_jax.optim`). ``direction`` and ``magnitude`` switch the ablations: the Hebbian sign
(ascent along ``Ĥ``), and magnitudes 1 (sign-SGD) or ``|G|`` (plain gradient).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union
import warnings

import flax
import jax
import jax.numpy as jnp
import optax

from ghl_jax import rules as rules_lib
from ghl_jax import selection as selection_lib
from ghl_jax import tap as tap_lib
from ghl_jax import trees
from ghl_jax.rule import Layers, Rule, TInv
DIRECTIONS = ('gradient', 'hebbian')
MAGNITUDES = ('hebbian', 'unit', 'gradient')


@flax.struct.dataclass
class Hebbian:
  """A raw Hebbian term ``H`` (kernel-shaped, float32); ``stacked`` leading axes index
  nn.scan blocks, each normalised on its own; ``rule``: the :class:`~ghl_jax.Rule` that made it
  (``ghl()`` takes it from there)."""
  term: jax.Array
  stacked: int = flax.struct.field(pytree_node=False, default=0)
  rule: Optional[Rule] = flax.struct.field(pytree_node=False, default=None)

  def normalized(self) -> jax.Array:
    axes = tuple(range(self.stacked, self.term.ndim))
    scale = jnp.max(jnp.abs(self.term), axis=axes, keepdims=True)
    return self.term / (scale + rules_lib.EPS)


def kernel_path(module_path: tuple) -> str:
  return '/'.join(module_path + ('kernel',))


def selected_layers(taps: Mapping, layers: Union[Layers, Rule] = None) -> dict:
  """``{kernel_path: tap_entry}`` of the kernels GHL governs among ``taps`` (:func:`ghl_jax.tap`),
  as :func:`ghl_jax.selection.of_taps` decides: ``layers`` is a :class:`~ghl_jax.Rule`, or (v1)
  ``None`` (every ``nn.Conv`` kernel), a regex or a collection of kernel paths."""
  rule = layers if isinstance(layers, Rule) else Rule(layers=layers)
  entries = {kernel_path(path): entry for path, entry in tap_lib.entries(taps)}
  return {g.rule_path: entries[g.rule_path] for g in selection_lib.of_taps(rule, taps).governed}


def _calls(entry) -> list:
  """``[(x, u, layer)]``, one per call of the tapped module."""
  inputs, outputs, layer = entry['inputs'], entry['outputs'], entry['layer']
  if not isinstance(inputs, tuple):
    inputs, outputs = (inputs,), (outputs,)
  layers = layer if isinstance(layer, tuple) else (layer,) * len(inputs)
  return list(zip(inputs, outputs, layers))


def hebbian_terms(params: Any, taps: Mapping, *, rule: Union[Rule, str, Callable] = 'softmax_oja',
                  t_inv: TInv = 1.0, layers: Layers = None, rule_kwargs: Optional[dict] = None) -> dict:
  """Raw local terms ``{kernel_path: Hebbian}`` of every layer ``rule`` governs (not normalised).

  ``rule`` is a :class:`~ghl_jax.Rule`, or (v1) a rule name with ``t_inv``, ``layers`` and
  ``rule_kwargs`` beside it. Raw terms add up: sum them over micro-batches or devices, then let
  ``ghl()`` normalise. A layer called several times (weight sharing) sums its calls.
  """
  rule = Rule.of(rule, t_inv=t_inv, layers=layers, rule_kwargs=rule_kwargs)
  entries = {kernel_path(path): entry for path, entry in tap_lib.entries(taps)}
  flat = trees.flat(params)
  terms = {}
  for g in selection_lib.of_taps(rule, taps, params).governed:
    kernel = trees.unbox(flat[g.path])
    fn = lambda x, u, w, layer, term=g.term: layer.term(term, x, u, w)
    for _ in range(g.stacked):
      fn = jax.vmap(fn, in_axes=(0, 0, 0, None))
    term = sum(fn(x, u, kernel, layer) for x, u, layer in _calls(entries[g.rule_path]))
    terms[g.path] = Hebbian(jax.lax.stop_gradient(term), g.stacked, rule)
  return terms


def combine(grad: jax.Array, h_hat: jax.Array, direction: str = 'gradient',
            magnitude: str = 'hebbian') -> jax.Array:
  """``sign(G) ⊙ |Ĥ|`` and its ablations; the Hebbian direction ascends along ``Ĥ``."""
  sign = jnp.sign(grad) if direction == 'gradient' else -jnp.sign(h_hat)
  size = {'hebbian': jnp.abs(h_hat), 'unit': 1.0, 'gradient': jnp.abs(grad)}[magnitude]
  return (sign * size).astype(grad.dtype)


class GHLState(NamedTuple):
  """ghl() keeps no state."""


_V1 = object()     # a v1 keyword left out


def _rule_of(t_inv, rule, layers, rule_kwargs) -> Optional[Rule]:
  """The Rule given to ``ghl()``: ``rule`` itself, one built from the v1 keywords (with a
  DeprecationWarning), or ``None`` when nothing is given (then the terms' own Rule is used)."""
  v1 = {k: v for k, v in (('t_inv', t_inv), ('layers', layers), ('rule_kwargs', rule_kwargs)) if v is not _V1}
  if isinstance(rule, Rule) or (rule is None and not v1):
    return Rule.of(rule, **v1) if rule is not None else None
  warnings.warn('ghl(t_inv=..., layers=..., rule=\'name\', rule_kwargs=...) is deprecated: pass '
                'ghl(rule=ghl_jax.Rule(name, t_inv=..., layers=..., **settings)).', DeprecationWarning, stacklevel=3)
  return Rule.of(rule, **v1)


def _check_terms(hebb: Mapping, rule: Optional[Rule]) -> None:
  for path, term in hebb.items():
    if not isinstance(term, Hebbian):
      raise ValueError(f'ghl: hebb[{path!r}] is a {type(term).__name__}, not a ghl_jax.Hebbian; pass the hebb '
                       'that ghl_jax.value_and_grad or hebbian_terms returns.')
    if rule is not None and term.rule is not None and not term.rule.same_terms(rule):
      raise ValueError(f'ghl(rule={rule!r}) differs from the Rule the terms were made with ({term.rule!r}); '
                       'give the Rule once, to value_and_grad, and use ghl() without one.')


def ghl(t_inv: TInv = _V1, *, rule: Union[Rule, str, Callable, None] = None, layers: Layers = _V1,
        rule_kwargs: Optional[dict] = _V1, direction: str = 'gradient',
        magnitude: str = 'hebbian', axis_name: Optional[str] = None
        ) -> optax.GradientTransformationExtraArgs:
  """Global-guided Hebbian learning: ``G ← sign(G) ⊙ |Ĥ|`` for every governed kernel.

  Args:
    rule: the :class:`~ghl_jax.Rule`. On the ``hebb=`` path it may be left out: the terms carry the
      Rule they were made with, and a different one here is an error. On the ``taps=`` path it
      defaults to ``Rule()``.
    t_inv, layers, rule_kwargs: (v1, deprecated) the Rule's settings as keywords, with ``rule`` the
      name of a rule in :mod:`ghl_jax.rules` or a callable.
    direction: ``'gradient'`` (sign of ``G``, GHL) or ``'hebbian'`` (ascent along ``Ĥ``).
    magnitude: ``'hebbian'`` (``|Ĥ|``, GHL), ``'unit'`` (sign-SGD) or ``'gradient'`` (``|G|``).
    axis_name: inside ``pmap``/``shard_map``, raw terms are summed over this axis before
      normalising, so every device sees the global-batch ``Ĥ``.

  ``update(grads, state, params, *, hebb)`` takes raw terms from :func:`ghl_jax.value_and_grad`
  (or :func:`hebbian_terms`, summed over micro-batches); ``update(..., taps=...)`` computes
  them from taps (``ghl_jax.tap``) with the rule. Errors, never a silent plain-SGD step: ``hebb``
  and ``taps`` together; a ``hebb`` path that is not a leaf of the updates, or that another
  optimizer group trains (``optax.multi_transform``). Boxed leaves (``nn.Partitioned``) keep their box.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f'ghl direction must be one of {DIRECTIONS}, got {direction!r}.')
  if magnitude not in MAGNITUDES:
    raise ValueError(f'ghl magnitude must be one of {MAGNITUDES}, got {magnitude!r}.')
  try:
    given = _rule_of(t_inv, rule, layers, rule_kwargs)
  except ValueError as error:
    raise ValueError(f'ghl: {error}') from None

  def init(params):
    del params
    return GHLState()

  def update(updates, state, params=None, *, taps=None, hebb=None, **extra):
    del extra
    if hebb is not None and taps is not None:
      raise ValueError('ghl takes hebb= or taps=, not both: the taps would be ignored. Pass hebb= (from '
                       'ghl_jax.value_and_grad) alone.')
    if hebb is None:
      if taps is None:
        raise ValueError('ghl needs hebb= (from ghl_jax.value_and_grad) or taps= (from ghl_jax.tap) '
                         'in tx.update(grads, state, params, hebb=...).')
      if params is None:
        raise ValueError('ghl needs params (for the Oja decay): call tx.update(grads, state, params, taps=...).')
      hebb = hebbian_terms(params, taps, rule=given or Rule())
    _check_terms(hebb, given)
    if axis_name is not None:
      hebb = jax.lax.psum(hebb, axis_name)
    flat, keys = trees.flat_paths(updates)
    missing = [path for path in hebb if path not in keys]
    if missing:
      raise ValueError(f'ghl: hebb has terms for {missing}, which are not leaves of the updates '
                       f'(e.g. {sorted(keys)[:4]}); pass tx.update the gradients of the tree '
                       'value_and_grad differentiated (its argnums).')
    masked = [path for path in hebb if isinstance(flat[keys[path]], optax.MaskedNode)]
    if masked:
      raise ValueError(f'ghl: kernels {masked} have Hebbian terms but another optimizer group trains them; '
                       'put them in the GHL group (optim.paper_sgd(kernels=selection), or the same paths '
                       'in optax.multi_transform).')
    for path, term in hebb.items():
      key = keys[path]
      flat[key] = trees.map_boxed(lambda g, term=term: combine(g, term.normalized(), direction, magnitude),
                                  flat[key])
    return trees.like(updates, flax.traverse_util.unflatten_dict(flat)), state

  return optax.GradientTransformationExtraArgs(init, update)
