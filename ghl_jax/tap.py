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

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghl_jax import linear_view

COLLECTION = 'intermediates'
TAPPED_TYPES = (nn.Conv, nn.Dense, nn.DenseGeneral, nn.Einsum, nn.ConvTranspose)
GENERAL_TYPES = (nn.DenseGeneral, nn.Einsum)     # read as the dense layer they are (linear_view)
_IGNORED_FIELDS = ('parent', 'name', 'use_bias', 'bias_init', 'kernel_init', 'dtype',
                   'param_dtype', 'precision', 'promote_dtype', 'preferred_element_type',
                   'dot_general', 'dot_general_cls',
                   'conv_general_dilated', 'conv_general_dilated_cls')   # how, not what


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Layer:
  """Static description of one tapped layer: its flax class and geometry fields.

  ``kernel_product(x, y)`` is ``Σ_sites y ⊗ x`` in the kernel's own layout, computed as the
  vjp of the (bias-free) layer with respect to its kernel with ``y`` as cotangent; for a
  conv this is the correlation of the padded input with ``y`` (no im2col).
  """
  module_type: type
  fields: tuple

  @classmethod
  def of(cls, module: nn.Module) -> 'Layer':
    fields = []
    for f in dataclasses.fields(module):
      if f.name in _IGNORED_FIELDS or not f.init:
        continue
      value = getattr(module, f.name)
      if f.name == 'mask' and value is not None:
        raise ValueError(f'{module.path}: masked convolutions are not supported by ghl_jax taps.')
      fields.append((f.name, _hashable(value)))
    return cls(type(module), tuple(fields))

  def __repr__(self):
    shown = ', '.join(f'{k}={v!r}' for k, v in self.fields if v is not None)
    return f'Layer({self.module_type.__name__}, {shown})'

  @property
  def is_conv(self) -> bool:
    return issubclass(self.module_type, nn.Conv)

  @property
  def kernel_ndim(self) -> int:
    """Rank of one (unstacked) kernel of this layer."""
    fields = dict(self.fields)
    count = lambda value: len(value) if isinstance(value, tuple) else 1
    if 'kernel_size' in fields:
      return count(fields['kernel_size']) + 2
    if issubclass(self.module_type, nn.DenseGeneral):
      return count(fields['batch_dims']) + count(fields['axis']) + count(fields['features'])
    if issubclass(self.module_type, nn.Einsum):
      return len(fields['shape'])
    return 2

  def spec(self, x_ndim: int) -> linear_view.Spec:
    """The einsum of a general linear layer (``nn.DenseGeneral``, ``nn.Einsum``) on a rank-``x_ndim`` input."""
    fields = dict(self.fields)
    if issubclass(self.module_type, nn.Einsum):
      return linear_view.einsum_spec(fields['einsum_str'])
    return linear_view.dense_general_spec(x_ndim, fields['features'], fields['axis'], fields['batch_dims'])

  def term(self, rule: Callable, x: jax.Array, u: jax.Array, kernel: jax.Array) -> jax.Array:
    """``rule(x, u, kernel, layer)`` of this layer: directly for Dense and convolutions; for
    ``nn.DenseGeneral`` / ``nn.Einsum`` on the dense layer it is (:mod:`ghl_jax.linear_view`; one
    per head if ``rule.per_head``)."""
    if not issubclass(self.module_type, GENERAL_TYPES):
      return rule(x, u, kernel, self)
    spec = self.spec(x.ndim)
    per_head = getattr(rule, 'per_head', False)
    outputs = [s for c, s in zip(spec.kernel, kernel.shape) if c not in spec.x]
    features = outputs[-1] if per_head else math.prod(outputs)
    return linear_view.evaluate(rule, Layer(nn.Dense, (('features', features),)), spec, x, u, kernel,
                                per_head=per_head)

  def linear_module(self) -> nn.Module:
    """The layer without bias, in float32: ``u = f(x; W)`` is linear in ``W``."""
    return self.module_type(**dict(self.fields), use_bias=False, dtype=jnp.float32,
                            param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)

  def apply(self, kernel: jax.Array, x: jax.Array) -> jax.Array:
    return self.linear_module().apply({'params': {'kernel': kernel}}, x)

  def kernel_product(self, x: jax.Array, y: jax.Array, kernel_shape) -> jax.Array:
    """``Σ_sites y ⊗ x`` with the shape of the kernel, accumulated in float32."""
    x = x.astype(jnp.float32)
    # zeros_like keeps x's per-device type inside shard_map: a vjp with respect to a
    # device-invariant kernel would sum the cotangent over devices.
    zero = jnp.zeros_like(x, shape=kernel_shape)
    _, pullback = jax.vjp(lambda k: self.apply(k, x), zero)
    return pullback(y.astype(jnp.float32))[0]


def _interceptor(types):
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, types):
      module = context.module
      module.sow(COLLECTION, 'inputs', args[0] if args else kwargs['inputs'])
      module.sow(COLLECTION, 'outputs', out)
      module.sow(COLLECTION, 'layer', Layer.of(module),
                 init_fn=lambda: None, reduce_fn=lambda _, new: new)
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
  if 'layer' in tree and isinstance(tree['layer'], Layer):
    entry = {'layer': tree['layer']}
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
  if 'layer' in taps and isinstance(taps.get('layer'), Layer):
    yield prefix, taps
    return
  for key, sub in taps.items():
    if isinstance(sub, Mapping):
      yield from entries(sub, prefix + (key,))
