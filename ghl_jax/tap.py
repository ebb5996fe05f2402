"""Taps: the inputs and outputs of every ``nn.Conv`` / ``nn.Dense`` call of a flax model.

``ghl_jax.tap(model.apply)`` wraps any function that applies linen modules. Through
``nn.intercept_methods`` it sows, for each tapped module call, the module's input ``x`` and
output ``u`` (its pre-activation) into flax's ``'intermediates'`` collection, plus a static
:class:`Layer` that records the module's geometry. The model itself is not modified.

The result is a nested dict mirroring the module tree::

    taps['conv1'] == {'inputs': x, 'outputs': u, 'layer': Layer(nn.Conv, ...)}

Under ``nn.scan`` (with ``variable_axes={'intermediates': 0, ...}``, the usual flax idiom) the
arrays come back stacked along a leading axis, aligned with the stacked kernels. A module
called several times in one pass (weight sharing) gives tuples of arrays, one per call.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn

from ghl_jax import adapters
from ghl_jax.adapters import Layer

COLLECTION = 'intermediates'
TAPPED_TYPES = adapters.LINEN_TYPES


def _interceptor(types):
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, types):
      module = context.module
      module.sow(COLLECTION, 'inputs', args[0] if args else kwargs['inputs'])
      module.sow(COLLECTION, 'outputs', out)
      module.sow(COLLECTION, 'layer', adapters.read(module, args, kwargs))
    return out
  return intercept


def _with_collection(mutable):
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return [COLLECTION]
  if isinstance(mutable, str):
    mutable = [mutable]
  mutable = list(mutable)
  return mutable if COLLECTION in mutable else mutable + [COLLECTION]


def _extract(tree: Any) -> Any:
  """Keeps only tap entries ({'inputs', 'outputs', 'layer'}); unwraps single-call tuples."""
  if not isinstance(tree, Mapping):
    return None
  if 'layer' in tree and _is_layers(tree['layer']):
    layers = tuple(tree['layer'])
    entry = {'layer': layers[0] if len(set(layers)) == 1 else layers}
    for key in ('inputs', 'outputs'):
      calls = tree[key]
      entry[key] = calls[0] if len(calls) == 1 else tuple(calls)
    return entry
  out = {}
  for key, sub in tree.items():
    sub = _extract(sub)
    if sub:
      out[key] = sub
  return out


def _is_layers(value) -> bool:
  return isinstance(value, Layer) or (isinstance(value, tuple) and bool(value)
                                      and all(isinstance(v, Layer) for v in value))


def _strip(tree: Any) -> Any:
  """Removes the tap entries from a user-visible intermediates tree."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, sub in tree.items():
    if isinstance(tree, Mapping) and 'layer' in tree and key in ('inputs', 'outputs', 'layer'):
      continue
    sub = _strip(sub)
    if not (isinstance(sub, Mapping) and not sub):
      out[key] = sub
  return out


def tap(fn: Callable, *, types: tuple = TAPPED_TYPES) -> Callable:
  """Wraps ``fn`` (e.g. ``model.apply``) to return ``(fn_output, taps)``.

  ``fn`` must accept flax's ``mutable=`` keyword. The output keeps ``fn``'s own form: with
  ``mutable=['batch_stats']`` it is ``(logits, new_state)``, without it just ``logits``.
  Works under ``jax.jit``, ``jax.grad(..., has_aux=True)``, ``nn.scan`` and ``nn.remat``.
  Call the wrapped function inside the traced function (not around a jitted one), as
  interceptors act at trace time.
  """
  @functools.wraps(fn)
  def tapped(*args, mutable=False, **kwargs):
    with nn.intercept_methods(_interceptor(types)):
      out, state = fn(*args, mutable=_with_collection(mutable), **kwargs)
    state = dict(state)
    inter = state.pop(COLLECTION, {})
    taps = _extract(inter) or {}
    user_wants = mutable is True or (
        mutable not in (False, None) and COLLECTION in ([mutable] if isinstance(mutable, str) else mutable))
    if user_wants:
      state[COLLECTION] = _strip(inter)
    if mutable is False or mutable is None:
      return out, taps
    return (out, state), taps

  return tapped


def entries(taps: Mapping, prefix: tuple = ()):
  """Yields ``(module_path, entry)`` for every tap entry, module paths as tuples of names."""
  if 'layer' in taps and _is_layers(taps.get('layer')):
    yield prefix, taps
    return
  for key, sub in taps.items():
    if isinstance(sub, Mapping):
      yield from entries(sub, prefix + (key,))
