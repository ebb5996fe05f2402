"""Which kernels GHL governs, with which settings: one :class:`Selection`, decided once.

A selection is built from a :class:`~ghl_jax.Rule` and one abstract trace of the model (linen: the
layers a function calls; NNX: the model's layers; or the layers of a taps tree) and says, for every
kernel of the model::

    governed   path, its Layer (ghl_jax.adapters), bound t_inv and rule settings, stacked axes
    left out   why (not a convolution under the default, not matched by layers=, no adapter)

``value_and_grad`` (linen and NNX), ``hebbian_terms``, ``ghl()``, the optimizer's groups, the trainer
and the run summary all read it; nothing else decides selection. ``print(selection.table())`` shows it.

Never silent: a rule that governs no kernel (the default, every ``nn.Conv`` kernel, on a model
without convolutions included), a ``layers=`` path or a ``t_inv`` key that matches no governed
kernel, and a differentiated tree that holds none of the governed kernels are each one error line.

The default for models without convolutions is an error that lists the model's kernels: GHL has no
paper-backed choice there (which dense layers are features and which is the read-out is the
model's business), so the user names them with ``Rule(..., layers=REGEX)``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
from flax import nnx
import jax
import numpy as np

from ghl_jax import adapters
from ghl_jax import tap as tap_lib
from ghl_jax import trees
from ghl_jax.adapters import Layer, Unsupported
from ghl_jax.rule import Rule, Term

KERNEL = 'kernel'


@dataclasses.dataclass(frozen=True)
class Governed:
  """One governed kernel: ``path`` in the differentiated tree, ``rule_path`` (module path +
  '/kernel', what ``layers=`` and ``t_inv`` keys match), its geometry, ``stacked`` leading axes
  (``nn.scan`` / ``nnx.scan`` blocks), its bound ``t_inv`` (``None`` for a rule without one)."""
  path: str
  rule_path: str
  layer: Layer
  stacked: int
  t_inv: Optional[float]
  term: Term


@dataclasses.dataclass(frozen=True)
class LeftOut:
  """A kernel GHL does not govern (it trains by the optimizer alone) and why."""
  path: str
  type_name: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Selection:
  """The kernels ``rule`` governs in one model (see the module docstring)."""
  rule: Rule
  governed: tuple
  left_out: tuple = ()

  @property
  def paths(self) -> tuple:
    """Paths of the governed kernels in the differentiated tree."""
    return tuple(g.path for g in self.governed)

  @property
  def rule_paths(self) -> tuple:
    return tuple(g.rule_path for g in self.governed)

  def __contains__(self, path: str) -> bool:
    return path in self.paths

  def __getitem__(self, path: str) -> Governed:
    for g in self.governed:
      if g.path == path:
        return g
    raise KeyError(path)

  def by_module(self) -> dict:
    """``{module path: Governed}``."""
    return {g.rule_path[:-len('/' + KERNEL)]: g for g in self.governed}

  def rows(self) -> list:
    """``[(kernel path, layer type, GHL column)]`` of every kernel, governed first."""
    rows = []
    for g in self.governed:
      ghl = rule_name(self.rule) + ('' if g.t_inv is None else f' t_inv={g.t_inv:g}')
      rows.append((g.rule_path, g.layer.module_type.__name__, ghl + (f' ×{g.stacked} stacked' if g.stacked else '')))
    for o in self.left_out:
      rows.append((o.path, o.type_name, f'not governed: {o.reason}'))
    return rows

  def table(self) -> str:
    """What GHL governs, one kernel a line, as aligned text."""
    lines = [('kernel', 'layer', 'GHL'), *self.rows()]
    width = [max(len(line[i]) for line in lines) for i in range(2)]
    return '\n'.join(f'{a:<{width[0]}}  {b:<{width[1]}}  {c}' for a, b, c in lines)


def rule_name(rule: Rule) -> str:
  return rule.name if isinstance(rule.name, str) else getattr(rule.name, '__name__', repr(rule.name))


def _module_of(rule_path: str) -> str:
  return rule_path.rsplit('/', 1)[0]


def select(rule: Rule, layers: Mapping[str, Union[Layer, Unsupported]],
           kernels: Optional[Mapping[str, Any]] = None, where: str = 'the model') -> Selection:
  """The :class:`Selection` of ``rule`` over ``layers`` (``{module path: Layer or Unsupported}``).

  ``kernels`` maps module paths to ``(path in the differentiated tree, kernel ndim)``; without it
  the path is the rule path and nothing is stacked. Raises ``ValueError`` (one line) where the
  rule governs nothing or a ``layers=`` path or ``t_inv`` key matches no governed kernel."""
  governed, left_out, candidates, unreadable = [], [], [], []
  for module, layer in layers.items():
    rule_path = f'{module}/{KERNEL}' if module else KERNEL
    if isinstance(layer, Unsupported):
      if rule.layers is not None and rule.selects(rule_path, False):
        raise ValueError(f'Rule layers={rule.layers!r} selects {rule_path}, the kernel of an '
                         f'{layer.type_name}, which GHL cannot read ({layer.reason}); leave it out of layers=.')
      left_out.append(LeftOut(rule_path, layer.type_name, f'GHL cannot read it ({layer.reason})'))
      unreadable.append(f'{rule_path} ({layer.type_name})')
      continue
    if kernels is not None and module not in kernels:   # shown in the table, never skipped unseen
      left_out.append(LeftOut(rule_path, layer.module_type.__name__, 'its kernel is not in the differentiated tree'))
      continue
    candidates.append(rule_path)
    path, ndim = kernels[module] if kernels is not None else (rule_path, layer.kernel_ndim)
    if rule.selects(rule_path, layer.is_conv):
      t_inv = rule.t_inv_for(rule_path) if rule.has_temperature else None
      governed.append(Governed(path, rule_path, layer, ndim - layer.kernel_ndim, t_inv, rule.term(rule_path)))
    else:
      why = ('not a convolution (the default governs nn.Conv kernels)' if rule.layers is None
             else f'not matched by layers={rule.layers!r}')
      left_out.append(LeftOut(rule_path, layer.module_type.__name__, why))
  selection = Selection(rule, tuple(governed), tuple(left_out))
  _check(selection, candidates, where)
  if unreadable:
    _log_unreadable(tuple(unreadable))
  return selection


def _check(selection: Selection, candidates: list, where: str) -> None:
  rule = selection.rule
  if not selection.governed:
    if not candidates:
      raise ValueError(f'{rule!r} governs no kernel: {where} has no layer GHL can read '
                       f'(left out: {[o.path for o in selection.left_out]}).')
    if rule.layers is None:
      raise ValueError(f'{rule!r} governs every convolution kernel and {where} has none; name the kernels '
                       f'to govern with Rule(..., layers=REGEX or paths). Its kernels: {candidates}.')
    raise ValueError(f'Rule layers={rule.layers!r} selects no kernel of {where}; its kernels: {candidates}.')
  if isinstance(rule.layers, tuple):
    missing = [p for p in rule.layers if p not in selection.rule_paths]
    if missing:
      raise ValueError(f'Rule layers= names {missing}, not kernels of {where}; its kernels: {candidates}.')
  if isinstance(rule.t_inv, tuple):
    unmatched = [key for key, _ in rule.t_inv if not any(_key_matches(key, g.rule_path) for g in selection.governed)]
    if unmatched:
      raise ValueError(f'Rule t_inv keys {unmatched} match no governed kernel (they would fall back to 1.0); '
                       f'governed: {list(selection.rule_paths)}.')


def _key_matches(key: str, rule_path: str) -> bool:
  if key in (rule_path, _module_of(rule_path)):
    return True
  try:
    return re.search(key, rule_path) is not None
  except re.error:
    return False


@functools.lru_cache(maxsize=None)
def _log_unreadable(kernels: tuple) -> None:
  logging.getLogger('ghl_jax').warning('GHL leaves out kernels it cannot read (they train by the optimizer '
                                       'alone): %s', ', '.join(kernels))


# ------------------------------------------------------------------------------------------------
# The layers of a model: one abstract trace.

def trace_linen(fun: Callable, *args, **kwargs) -> dict:
  """``{module path: Layer or Unsupported}`` of every linen layer with a kernel that
  ``fun(*args, **kwargs)`` calls, in call order, found by tracing it abstractly (no compute). Array
  arguments may be abstract (``jax.ShapeDtypeStruct``); every other argument is passed as it is."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for leaf in leaves]
  found = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    if context.method_name == '__call__':
      layer = adapters.read(context.module, call_args, call_kwargs)
      if layer is not None:
        found.setdefault('/'.join(context.module.path), layer)
    return out

  def run(*arrays):
    given = iter(arrays)
    call_args, call_kwargs = jax.tree.unflatten(
        treedef, [next(given) if array else leaf for leaf, array in zip(leaves, is_array)])
    return fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(run, *[leaf for leaf, array in zip(leaves, is_array) if array])
  return found


def locate(tree, layers: Mapping) -> dict:
  """``{module path: (kernel path in tree, ndim)}`` for the layers whose kernel ``tree`` holds (the
  'params' collection itself, or a variables dict holding it)."""
  flat = trees.flat(tree)
  found = {}
  for module in layers:
    for prefix in ('', 'params/'):
      path = prefix + (f'{module}/{KERNEL}' if module else KERNEL)
      if path in flat and hasattr(trees.unbox(flat[path]), 'shape'):     # not an optax.MaskedNode
        found[module] = (path, len(trees.unbox(flat[path]).shape))
        break
  return found


def of_linen(rule: Rule, fun: Callable, args: tuple, kwargs: Mapping, tree, where: str) -> Selection:
  """The selection of ``rule`` in the kernels of ``tree`` (the differentiated argument of ``fun``)."""
  layers = trace_linen(fun, *args, **kwargs)
  kernels = locate(tree, layers)
  if layers and not any(module in kernels for module, layer in layers.items() if isinstance(layer, Layer)):
    raise ValueError(f'{where} holds none of the model\'s kernels {sorted(layers)}: differentiate the params '
                     '(argnums= pointing at the tree that holds them).')
  return select(rule, layers, kernels, 'the model')


def of_model(rule: Rule, model: nn.Module, sample, **apply_kwargs) -> Selection:
  """The selection of ``rule`` in a linen ``model`` on inputs like ``sample`` (paths in its params)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, **apply_kwargs))
  return of_linen(rule, model.apply, (variables, sample), apply_kwargs, variables['params'], 'the params')


def nnx_layers(model) -> dict:
  """``{module path: (Layer or Unsupported, module)}`` of an NNX model's layers with a kernel."""
  found = {}
  for parts, module in nnx.iter_modules(model):
    layer = adapters.read(module)
    if layer is not None:
      found['/'.join(str(p) for p in parts)] = (layer, module)
  return found


def of_nnx(rule: Rule, model) -> Selection:
  """The selection of ``rule`` in an NNX ``model`` (paths of ``nnx.state(model, nnx.Param)``)."""
  layers = nnx_layers(model)
  kernels = {m: (f'{m}/{KERNEL}' if m else KERNEL, module.kernel[...].ndim)
             for m, (layer, module) in layers.items() if isinstance(layer, Layer)}
  return select(rule, {m: layer for m, (layer, _) in layers.items()}, kernels, 'the model')


def of_taps(rule: Rule, taps: Mapping, params=None) -> Selection:
  """The selection of ``rule`` among the layers of a taps tree (:func:`ghl_jax.tap`)."""
  layers = {}
  for path, entry in tap_lib.entries(taps):
    layer = entry['layer']
    layers['/'.join(path)] = layer[0] if isinstance(layer, tuple) else layer
  kernels = locate(params, layers) if params is not None else None
  return select(rule, layers, kernels, 'the taps')
