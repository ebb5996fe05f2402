"""Model summary printed at the start of a run: parameters per top-level module, FLOPs per image,
and what GHL governs, kernel by kernel (:meth:`ghl_jax.selection.Selection.table`).

Forward FLOPs count each ``nn.Conv`` / ``nn.Dense`` call as ``2·|u|·fan_in``: ``|u|`` outputs for
one image, ``fan_in = prod(kernel_size)·C_in / feature_group_count`` (conv) or ``C_in`` (dense).
Shapes come from tracing ``model.apply`` with :func:`jax.eval_shape` (nothing is computed); calls
inside ``nn.scan`` count once per scanned copy (their taps come back stacked). Other ops (norms,
pooling, attention's own products) are not counted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from typing import Optional

import flax.linen as nn
import jax

from ghl_jax import adapters
from ghl_jax.selection import Selection
from ghl_jax.tap import entries, tap


@dataclasses.dataclass(frozen=True)
class Summary:
  """``rows``: ``(top-level module, parameters, forward FLOPs per image)`` in call order;
  ``first_conv``: module path of the first ``nn.Conv`` called (None without one); ``selection``:
  what GHL governs (its table follows the module table)."""
  rows: tuple
  first_conv: tuple | None
  selection: Optional[Selection] = None

  @property
  def params(self) -> int:
    return sum(row[1] for row in self.rows)

  @property
  def flops(self) -> int:
    return sum(row[2] for row in self.rows)

  def table(self) -> str:
    """The rows and their total as aligned text."""
    lines = [(name, f'{p:,}', _si(f) if f else '-') for name, p, f in self.rows]
    lines = [('module', 'params', 'FLOPs/image'), *lines, ('total', f'{self.params:,}', _si(self.flops))]
    width = [max(len(line[i]) for line in lines) for i in range(3)]
    table = '\n'.join(f'{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}' for a, b, c in lines)
    if self.selection is None:
      return table
    return f'{table}\n\n{self.selection.table()}'


  def first_kernel(self, params: Any):
    """The first conv's kernel in ``params`` (None without a conv)."""
    if self.first_conv is None:
      return None
    for key in self.first_conv:
      params = params[key]
    return params['kernel']


def _si(count: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if count >= scale:
      return f'{count / scale:.3g}{unit}'
  return f'{count:.0f}'


def _calls(entry) -> list:
  """``[(inputs, outputs)]`` of one tap entry (one pair per call of a shared module)."""
  pair = entry['inputs'], entry['outputs']
  return list(zip(*pair)) if isinstance(pair[0], tuple) else [pair]


def layer_flops(taps) -> dict:
  """``{module path: forward FLOPs}`` of the calls in ``taps`` (:func:`ghl_jax.tap`): ``2·|u|·fan_in``
  summed over a module's calls; stacked ``nn.scan`` taps count every copy."""
  return {path: sum(2 * math.prod(u.shape) * _layer(entry).fan_in(x.shape) for x, u in _calls(entry))
          for path, entry in entries(taps) if _layer(entry).is_conv or _layer(entry).is_dense}


def _layer(entry):
  return entry['layer'][0] if isinstance(entry['layer'], tuple) else entry['layer']


def summarize(model: nn.Module, sample: jax.Array, selection: Optional[Selection] = None) -> Summary:
  """The :class:`Summary` of ``model`` on images shaped like ``sample`` (``[1, H, W, C]``), with
  ``selection``'s table of what GHL governs."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(sample.shape[1:]), sample.dtype)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)
  called = {}                                    # module path → its Layer, in call order

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      called.setdefault(tuple(context.module.path), adapters.read(context.module, args, kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, taps = jax.eval_shape(lambda v, x: tap(model.apply)(v, x, train=False),
                             variables, sample)
  flops = {}
  for path, count in layer_flops(taps).items():
    flops[path[0]] = flops.get(path[0], 0) + count
  params = {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
            for name, tree in variables.get('params', {}).items()}
  order = list(dict.fromkeys([path[0] for path in called] + sorted(params) + sorted(flops)))
  rows = tuple((name, params.get(name, 0), flops.get(name, 0)) for name in order
               if params.get(name) or flops.get(name))
  first_conv = next((path for path, layer in called.items() if getattr(layer, 'is_conv', False)), None)
  return Summary(rows, first_conv, selection)
