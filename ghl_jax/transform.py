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

import inspect
import re
from typing import Any, Collection, Mapping, NamedTuple, Optional, Union

import flax
import jax
import jax.numpy as jnp
import optax

from ghl_jax import rules as rules_lib
from ghl_jax import tap as tap_lib

Layers = Optional[Union[str, Collection[str]]]
TInv = Union[float, Mapping[str, float]]
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


def _is_selected(path: str, layer: tap_lib.Layer, layers: Layers) -> bool:
  if layers is None:
    return layer.is_conv
  if isinstance(layers, str):
    return re.search(layers, path) is not None
  return path in layers


def selected_layers(taps: Mapping, layers: Layers = None) -> dict:
  """``{kernel_path: tap_entry}`` for the kernels GHL governs.

  ``layers=None`` selects every ``nn.Conv`` kernel (the paper); a string is a regex searched
  in '/'-joined kernel paths (e.g. ``'conv|mlp'``); a collection lists exact kernel paths.
  """
  chosen = {kernel_path(path): entry for path, entry in tap_lib.entries(taps)
            if _is_selected(kernel_path(path), entry['layer'], layers)}
  if layers is not None and not chosen:
    known = [kernel_path(p) for p, _ in tap_lib.entries(taps)]
    raise ValueError(f'ghl layers={layers!r} selects no tapped kernel; tapped kernels are {known}.')
  return chosen


def per_layer(path: str, value: TInv, default: Optional[float] = None) -> Optional[float]:
  """A per-layer setting of the kernel at ``path``: ``value`` itself if it is a float, else
  its entry for the module path (exact, then the first regex found in ``path``), else ``default``."""
  if not isinstance(value, Mapping):
    return float(value)
  module = path.rsplit('/', 1)[0]
  for key in (module, path):
    if key in value:
      return float(value[key])
  for pattern, entry in value.items():
    if re.search(pattern, path):
      return float(entry)
  return default


def t_inv_for(path: str, t_inv: TInv) -> float:
  """``t_inv`` of one layer: a float, or a mapping from module path (exact, then regex) to float."""
  return per_layer(path, t_inv, 1.0)


def _get(tree: Any, path: str):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def _rule_fn(rule, path, t_inv, rule_kwargs):
  fn = rules_lib.get(rule)
  kwargs = dict(rule_kwargs or {})
  if 't_inv' in inspect.signature(fn).parameters:
    kwargs.setdefault('t_inv', t_inv_for(path, t_inv))
  return lambda x, u, w, layer: fn(x, u, w, layer, **kwargs)


def hebbian_terms(params: Any, taps: Mapping, *, rule='softmax_oja', t_inv: TInv = 1.0,
                  layers: Layers = None, rule_kwargs: Optional[dict] = None) -> dict:
  """Raw local terms ``{kernel_path: Hebbian}`` of every selected layer (not normalised).

  Raw terms add up: sum them over micro-batches or devices, then let ``ghl()`` normalise.
  A layer called several times (weight sharing) sums its calls.
  """
  terms = {}
  for path, entry in selected_layers(taps, layers).items():
    kernel = _get(params, path)
    if isinstance(kernel, optax.MaskedNode):
      continue
    layer = entry['layer']
    stacked = kernel.ndim - layer.kernel_ndim
    fn = _rule_fn(rule, path, t_inv, rule_kwargs)
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


def ghl(t_inv: TInv = 1.0, *, layers: Layers = None, rule='softmax_oja',
        rule_kwargs: Optional[dict] = None, direction: str = 'gradient',
        magnitude: str = 'hebbian', axis_name: Optional[str] = None
        ) -> optax.GradientTransformationExtraArgs:
  """Global-guided Hebbian learning: ``G ← sign(G) ⊙ |Ĥ|`` for every selected kernel.

  Args:
    t_inv: inverse softmax temperature, a float or a mapping from module path/regex to float
      (unmatched layers use 1.0).
    layers: ``None`` (every nn.Conv kernel), a regex over '/'-joined kernel paths, or a
      collection of exact kernel paths.
    rule: name of a rule in :mod:`ghl_jax.rules` or a callable with the same signature.
    rule_kwargs: extra keyword arguments of the rule (e.g. ``{'decay': False}``).
    direction: ``'gradient'`` (sign of ``G``, GHL) or ``'hebbian'`` (ascent along ``Ĥ``).
    magnitude: ``'hebbian'`` (``|Ĥ|``, GHL), ``'unit'`` (sign-SGD) or ``'gradient'`` (``|G|``).
    axis_name: inside ``pmap``/``shard_map``, raw terms are summed over this axis before
      normalising, so every device sees the global-batch ``Ĥ``.

  ``update(grads, state, params, *, taps)`` computes the terms from taps (``ghl_jax.tap``);
  ``update(..., hebb=hebbian_terms(...))`` takes precomputed raw terms instead (used for
  gradient accumulation).
  """
  if direction not in DIRECTIONS:
    raise ValueError(f'ghl direction must be one of {DIRECTIONS}, got {direction!r}.')
  if magnitude not in MAGNITUDES:
    raise ValueError(f'ghl magnitude must be one of {MAGNITUDES}, got {magnitude!r}.')
  for path, value in ((None, t_inv),) if not isinstance(t_inv, Mapping) else t_inv.items():
    if not float(value) > 0:
      raise ValueError(f'ghl t_inv must be > 0, got {value!r}' + (f' for {path!r}.' if path else '.'))
  rules_lib.get(rule)

  def init(params):
    del params
    return GHLState()

  def update(updates, state, params=None, *, taps=None, hebb=None, **extra):
    del extra
    if params is None:
      raise ValueError('ghl needs params (for the Oja decay): call tx.update(grads, state, params, taps=...).')
    if hebb is None:
      if taps is None:
        raise ValueError('ghl needs taps=ghl_jax.tap(apply)(...)[1] or hebb=hebbian_terms(...) in tx.update.')
      hebb = hebbian_terms(params, taps, rule=rule, t_inv=t_inv, layers=layers, rule_kwargs=rule_kwargs)
    if axis_name is not None:
      hebb = jax.lax.psum(hebb, axis_name)
    flat = flax.traverse_util.flatten_dict(_as_dict(updates), sep='/', keep_empty_nodes=True)
    for path, term in hebb.items():
      grad = flat.get(path)
      if grad is None or isinstance(grad, optax.MaskedNode):
        continue
      flat[path] = combine(grad, term.normalized(), direction, magnitude)
    return _like(updates, flax.traverse_util.unflatten_dict(flat, sep='/')), state

  return optax.GradientTransformationExtraArgs(init, update)


def _as_dict(tree):
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _like(template, tree):
  return flax.core.freeze(tree) if isinstance(template, flax.core.FrozenDict) else tree
