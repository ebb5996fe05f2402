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

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from ghl_jax import rules as rules_lib
from ghl_jax import tap as tap_lib
from ghl_jax.rule import Layers, Rule, TInv
DIRECTIONS = ('gradient', 'hebbian')
MAGNITUDES = ('hebbian', 'unit', 'gradient')


@flax.struct.dataclass
class Hebbian:
  """A raw Hebbian term ``H`` (kernel-shaped, float32); ``stacked`` leading axes index
  nn.scan blocks, each normalised on its own."""
  term: jax.Array
  stacked: int = flax.struct.field(pytree_node=False, default=0)

  def normalized(self) -> jax.Array:
    axes = tuple(range(self.stacked, self.term.ndim))
    scale = jnp.max(jnp.abs(self.term), axis=axes, keepdims=True)
    return self.term / (scale + rules_lib.EPS)


def kernel_path(module_path: tuple) -> str:
  return '/'.join(module_path + ('kernel',))


def selected_layers(taps: Mapping, layers: Union[Layers, Rule] = None) -> dict:
  """``{kernel_path: tap_entry}`` for the kernels GHL governs.

  ``layers=None`` selects every ``nn.Conv`` kernel (the paper); a string is a regex searched
  in '/'-joined kernel paths (e.g. ``'conv|mlp'``); a collection lists exact kernel paths; a
  :class:`~ghl_jax.Rule` selects by its own ``layers``.
  """
  rule = layers if isinstance(layers, Rule) else Rule(layers=layers)
  chosen = {kernel_path(path): entry for path, entry in tap_lib.entries(taps)
            if rule.selects(kernel_path(path), entry['layer'].is_conv)}
  if rule.layers is not None and not chosen:
    known = [kernel_path(p) for p, _ in tap_lib.entries(taps)]
    raise ValueError(f'ghl layers={rule.layers!r} selects no tapped kernel; tapped kernels are {known}.')
  return chosen


def _get(tree: Any, path: str):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def hebbian_terms(params: Any, taps: Mapping, *, rule: Union[Rule, str, Callable] = 'softmax_oja',
                  t_inv: TInv = 1.0, layers: Layers = None, rule_kwargs: Optional[dict] = None) -> dict:
  """Raw local terms ``{kernel_path: Hebbian}`` of every layer ``rule`` selects (not normalised).

  ``rule`` is a :class:`~ghl_jax.Rule`, or (v1) a rule name with ``t_inv``, ``layers`` and
  ``rule_kwargs`` beside it. Raw terms add up: sum them over micro-batches or devices, then let
  ``ghl()`` normalise. A layer called several times (weight sharing) sums its calls.
  """
  rule = Rule.of(rule, t_inv=t_inv, layers=layers, rule_kwargs=rule_kwargs)
  terms = {}
  for path, entry in selected_layers(taps, rule).items():
    kernel = _get(params, path)
    if isinstance(kernel, optax.MaskedNode):
      continue
    layer = entry['layer']
    stacked = kernel.ndim - layer.kernel_ndim
    rule_term = rule.term(path)
    fn = lambda x, u, w, layer: layer.term(rule_term, x, u, w)
    for _ in range(stacked):
      fn = jax.vmap(fn, in_axes=(0, 0, 0, None))
    calls = entry['inputs'], entry['outputs']
    if not isinstance(calls[0], tuple):
      calls = (calls[0],), (calls[1],)
    term = sum(fn(x, u, kernel, layer) for x, u in zip(*calls))
    terms[path] = Hebbian(jax.lax.stop_gradient(term), stacked)
  return terms


def combine(grad: jax.Array, h_hat: jax.Array, direction: str = 'gradient',
            magnitude: str = 'hebbian') -> jax.Array:
  """``sign(G) ⊙ |Ĥ|`` and its ablations; the Hebbian direction ascends along ``Ĥ``."""
  sign = jnp.sign(grad) if direction == 'gradient' else -jnp.sign(h_hat)
  size = {'hebbian': jnp.abs(h_hat), 'unit': 1.0, 'gradient': jnp.abs(grad)}[magnitude]
  return (sign * size).astype(grad.dtype)


class GHLState(NamedTuple):
  """ghl() keeps no state."""


def ghl(t_inv: TInv = 1.0, *, rule: Union[Rule, str, Callable] = 'softmax_oja', layers: Layers = None,
        rule_kwargs: Optional[dict] = None, direction: str = 'gradient',
        magnitude: str = 'hebbian', axis_name: Optional[str] = None
        ) -> optax.GradientTransformationExtraArgs:
  """Global-guided Hebbian learning: ``G ← sign(G) ⊙ |Ĥ|`` for every selected kernel.

  Args:
    t_inv: (v1) inverse softmax temperature, a float or a mapping from module path/regex to
      float (unmatched layers use 1.0).
    rule: a :class:`~ghl_jax.Rule` (then give no ``t_inv``/``layers``/``rule_kwargs``), or (v1) the
      name of a rule in :mod:`ghl_jax.rules` or a callable with the same signature.
    layers: (v1) ``None`` (every nn.Conv kernel), a regex over '/'-joined kernel paths, or a
      collection of exact kernel paths.
    rule_kwargs: (v1) extra keyword arguments of the rule (e.g. ``{'decay': False}``).
    direction: ``'gradient'`` (sign of ``G``, GHL) or ``'hebbian'`` (ascent along ``Ĥ``).
    magnitude: ``'hebbian'`` (``|Ĥ|``, GHL), ``'unit'`` (sign-SGD) or ``'gradient'`` (``|G|``).
    axis_name: inside ``pmap``/``shard_map``, raw terms are summed over this axis before
      normalising, so every device sees the global-batch ``Ĥ``.

  ``update(grads, state, params, *, hebb)`` takes raw terms from :func:`ghl_jax.value_and_grad`
  (or :func:`hebbian_terms`, summed over micro-batches); ``update(..., taps=...)`` computes
  them from taps (``ghl_jax.tap``) with the rule.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f'ghl direction must be one of {DIRECTIONS}, got {direction!r}.')
  if magnitude not in MAGNITUDES:
    raise ValueError(f'ghl magnitude must be one of {MAGNITUDES}, got {magnitude!r}.')
  try:
    rule = Rule.of(rule, t_inv=t_inv, layers=layers, rule_kwargs=rule_kwargs)
  except ValueError as error:
    raise ValueError(f'ghl: {error}') from None

  def init(params):
    del params
    return GHLState()

  def update(updates, state, params=None, *, taps=None, hebb=None, **extra):
    del extra
    if hebb is None:
      if taps is None:
        raise ValueError('ghl needs hebb= (from ghl_jax.value_and_grad) or taps= (from ghl_jax.tap) '
                         'in tx.update(grads, state, params, hebb=...).')
      if params is None:
        raise ValueError('ghl needs params (for the Oja decay): call tx.update(grads, state, params, taps=...).')
      hebb = hebbian_terms(params, taps, rule=rule)
    if axis_name is not None:
      hebb = jax.lax.psum(hebb, axis_name)
    flat, keys = flat_paths(updates)
    for path, term in hebb.items():
      grad = flat.get(keys.get(path))
      if grad is None or isinstance(grad, optax.MaskedNode):
        continue
      flat[keys[path]] = combine(grad, term.normalized(), direction, magnitude)
    return like(updates, flax.traverse_util.unflatten_dict(flat)), state

  return optax.GradientTransformationExtraArgs(init, update)


def flat_paths(tree, keep_empty_nodes: bool = True) -> tuple[dict, dict]:
  """``(flat, keys)``: ``tree``'s leaves by key tuple (``flax.traverse_util.flatten_dict``) and
  ``{'/'-joined path: key tuple}``; keys may be ints (NNX list indices)."""
  flat = flax.traverse_util.flatten_dict(as_plain_dict(tree), keep_empty_nodes=keep_empty_nodes)
  return flat, {'/'.join(map(str, key)): key for key in flat}


def as_plain_dict(tree):
  """A plain nested dict of a params-like tree (dict, FrozenDict, or an ``nnx.State``)."""
  if isinstance(tree, flax.core.FrozenDict):
    return flax.core.unfreeze(tree)
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return tree


def like(template, tree):
  if isinstance(template, flax.core.FrozenDict):
    return flax.core.freeze(tree)
  if isinstance(template, nnx.State):
    return nnx.State(tree)
  return tree
