"""``Rule``: one local plasticity rule and the kernels it governs, in one frozen object.

::

    rule = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25}, layers=None)
    H = rule.term(path, layer)(x, u, kernel)       # raw term of one layer (see ghl_jax.rules)

Every consumer reads the same object: :func:`ghl_jax.ghl`, :func:`ghl_jax.value_and_grad`,
:func:`ghl_jax.hebbian_terms`, the Hebbian baselines (:mod:`ghl_jax.hebbian`),
:func:`ghl_jax.optim.paper_sgd` and the trainer's configs.

* ``name``: a rule of :data:`ghl_jax.rules.RULES`, or a callable ``rule(x, u, kernel, layer, **hyper)``.
* ``t_inv``: the inverse softmax temperature, a float or a mapping from module path (exact, then
  the first regex found in the kernel path) to float; unmatched layers use 1.0.
* ``layers``: ``None`` (every ``nn.Conv`` kernel, the paper), a regex searched in '/'-joined
  kernel paths, or a collection of exact kernel paths.
* ``per_head``: in general linear kernels with several output axes (attention's query/key/value
  ``(embed, heads, head_dim)``), the leading output axes become separate layers, so the neurons of
  each head compete only among themselves (softmax over the last output axis). Default ``False``:
  all output axes flattened into one competition.
* ``**hyper``: the rule's other keyword arguments (e.g. ``decay=False``).

A ``Rule`` is hashable and static under ``jax.jit`` (a pytree with no leaves).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Collection, Mapping, Optional, Union

import jax

from ghl_jax import rules as rules_lib

Layers = Optional[Union[str, Collection[str]]]
TInv = Union[float, Mapping[str, float]]


def _frozen_layers(layers: Layers):
  if layers is None or isinstance(layers, str):
    if isinstance(layers, str):
      try:
        re.compile(layers)
      except re.error as error:
        raise ValueError(f'Rule layers={layers!r} is not a valid regex ({error}).') from None
    return layers
  if isinstance(layers, Collection) and all(isinstance(p, str) for p in layers):
    return tuple(layers)
  raise ValueError(f'Rule layers must be None, a regex or a collection of kernel paths, got {layers!r}.')


def _frozen_t_inv(t_inv: TInv):
  pairs = tuple(t_inv.items()) if isinstance(t_inv, Mapping) else ((None, t_inv),)
  for key, value in pairs:
    try:
      ok = float(value) > 0
    except (TypeError, ValueError):
      ok = False
    if not ok:
      where = f' for {key!r}' if key is not None else ''
      raise ValueError(f'Rule t_inv must be a number > 0, got {value!r}{where}.')
  if isinstance(t_inv, Mapping):
    return tuple((str(k), float(v)) for k, v in t_inv.items())
  return float(t_inv)


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
  try:
    return inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return {}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, init=False)
class Rule:
  """A local rule with its settings and the kernels it applies to (see the module docstring)."""
  name: Union[str, Callable]
  t_inv: Union[float, tuple]          # a float, or ((module path or regex, float), ...)
  layers: Union[None, str, tuple]
  hyper: tuple                        # ((keyword, value), ...) of the rule function
  per_head: bool = False

  def __init__(self, name: Union[str, Callable] = 'softmax_oja', *, t_inv: TInv = 1.0,
               layers: Layers = None, per_head: bool = False, **hyper):
    fn = rules_lib.get(name)
    params = _parameters(fn)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    settings = [k for k in list(params)[4:] if k != 't_inv']
    if 't_inv' in hyper:
      raise ValueError('Rule: pass t_inv as its own argument, Rule(name, t_inv=...).')
    unknown = sorted(k for k in hyper if k not in params and not takes_any)
    if unknown:
      raise ValueError(f'Rule {getattr(fn, "__name__", name)!r} takes no {unknown}; its settings are '
                       f'{settings}.')
    frozen_t_inv = _frozen_t_inv(t_inv)
    if frozen_t_inv != 1.0 and 't_inv' not in params and not takes_any:
      raise ValueError(f'Rule {getattr(fn, "__name__", name)!r} has no temperature: drop t_inv={t_inv!r}.')
    try:
      hash(tuple(hyper.values()))
    except TypeError:
      raise ValueError(f'Rule settings must be plain values (numbers, strings, booleans), got {hyper!r}.'
                       ) from None
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 't_inv', frozen_t_inv)
    object.__setattr__(self, 'layers', _frozen_layers(layers))
    object.__setattr__(self, 'hyper', tuple(sorted(hyper.items())))
    if not isinstance(per_head, bool):
      raise ValueError(f'Rule per_head must be True or False, got {per_head!r}.')
    object.__setattr__(self, 'per_head', per_head)

  @classmethod
  def of(cls, rule: Union['Rule', str, Callable, None] = None, *, t_inv: TInv = 1.0,
         layers: Layers = None, rule_kwargs: Optional[Mapping[str, Any]] = None) -> 'Rule':
    """A ``Rule`` from the v1 keyword form (``rule='name', t_inv=..., layers=..., rule_kwargs=...``;
    as in v1, ``t_inv`` is ignored by a rule that has no temperature), or ``rule`` itself when it
    already is one (then the other settings must stay at their defaults)."""
    if isinstance(rule, Rule):
      given = [k for k, v, d in (('t_inv', t_inv, 1.0), ('layers', layers, None),
                                 ('rule_kwargs', rule_kwargs, None)) if v != d and v is not d]
      if given:
        raise ValueError(f'{given} given beside rule={rule!r}: put them in the Rule '
                         '(Rule(name, t_inv=..., layers=..., **settings)).')
      return rule
    rule = 'softmax_oja' if rule is None else rule
    if 't_inv' not in _parameters(rules_lib.get(rule)):
      t_inv = 1.0                           # v1: a shared t_inv is ignored by rules without one
    return cls(rule, t_inv=t_inv, layers=layers, **dict(rule_kwargs or {}))

  def same_terms(self, other: 'Rule') -> bool:
    """Whether ``other`` gives every kernel the same term: all settings equal but ``layers`` (which
    kernels are governed is the selection's business, checked where the terms meet the updates)."""
    return (self.name, self.t_inv, self.hyper, self.per_head) == (other.name, other.t_inv, other.hyper,
                                                                  other.per_head)

  def replace(self, **changes) -> 'Rule':
    """A copy with some settings changed (``name``, ``t_inv``, ``layers`` or rule settings)."""
    name = changes.pop('name', self.name)
    settings = {'t_inv': self.t_inv_mapping, 'layers': self.layers, 'per_head': self.per_head,
                **dict(self.hyper), **changes}
    return Rule(name, **settings)

  @property
  def fn(self) -> Callable:
    """The rule function ``rule(x, u, kernel, layer, **hyper)``."""
    return rules_lib.get(self.name)

  @property
  def has_temperature(self) -> bool:
    """Whether the rule function takes ``t_inv``."""
    params = _parameters(self.fn)
    return 't_inv' in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

  @property
  def t_inv_mapping(self) -> TInv:
    """``t_inv`` as given: a float or a dict."""
    return dict(self.t_inv) if isinstance(self.t_inv, tuple) else self.t_inv

  def selects(self, path: str, is_conv: bool) -> bool:
    """Whether the kernel at '/'-joined ``path`` (of an ``nn.Conv`` when ``is_conv``) is governed."""
    if self.layers is None:
      return is_conv
    if isinstance(self.layers, str):
      return re.search(self.layers, path) is not None
    return path in self.layers

  def t_inv_for(self, path: str) -> float:
    """``t_inv`` of the kernel at ``path``: the float, or the mapping's entry for the module path
    (exact), the kernel path (exact), else the first regex found in the path; 1.0 otherwise."""
    value = per_layer(path, self.t_inv_mapping)
    return 1.0 if value is None else value

  def term(self, path: str) -> 'Term':
    """``(x, u, kernel, layer) -> raw H`` of the kernel at ``path`` (its ``t_inv`` and settings bound)."""
    kwargs = dict(self.hyper)
    if 't_inv' in _parameters(self.fn):
      kwargs['t_inv'] = self.t_inv_for(path)
    return Term(self.fn, tuple(sorted(kwargs.items())), self.per_head)

  def __repr__(self):
    name = self.name if isinstance(self.name, str) else getattr(self.name, '__name__', repr(self.name))
    shown = [repr(name), f't_inv={self.t_inv_mapping!r}']
    if self.layers is not None:
      shown.append(f'layers={self.layers!r}')
    if self.per_head:
      shown.append('per_head=True')
    shown += [f'{k}={v!r}' for k, v in self.hyper]
    return f'Rule({", ".join(shown)})'


@dataclasses.dataclass(frozen=True)
class Term:
  """One kernel's bound rule: ``term(x, u, kernel, layer) -> raw H``; ``per_head`` as in :class:`Rule`."""
  fn: Callable
  kwargs: tuple
  per_head: bool = False

  def __call__(self, x, u, kernel, layer):
    return self.fn(x, u, kernel, layer, **dict(self.kwargs))


def per_layer(path: str, value: Union[float, Mapping[str, float]], default: Optional[float] = None
              ) -> Optional[float]:
  """A per-layer setting of the kernel at ``path``: ``value`` itself if it is a number, else its
  entry for the module path or the kernel path (exact), else the first regex found in ``path``,
  else ``default``."""
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
