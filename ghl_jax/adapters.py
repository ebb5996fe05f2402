"""The one place that knows flax layers: how each kernel reads as a convolution or a dense layer.

Every linen and NNX layer GHL can govern has one entry in :data:`ADAPTERS`: its linen class, its NNX
class, and how the module's fields give the static geometry :class:`Layer` that the rules use::

    nn.Conv / nnx.Conv                    convolution: W (*window, C_in/groups, C_out)
    nn.ConvTranspose / nnx.ConvTranspose  transposed convolution, read by its vjp
    nn.Dense / nnx.Linear                 dense: W (C_in, C_out)
    nn.DenseGeneral / nnx.LinearGeneral   the dense layer it is (ghl_jax.linear_view)
    nn.Einsum / nnx.Einsum                the dense layer it is, equation of the call

A module that owns a ``'kernel'`` param and has no entry (``nn.ConvLocal``: one kernel per output
position) is :class:`Unsupported`, with the reason; GHL never governs it and says so. Adding a layer
type is one entry here plus its reference test; no other module checks flax layer classes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from ghl_jax import linear_view

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
  """Static geometry of one layer call: its linen class and the fields that say what it computes.

  ``kernel_product(x, y)`` is ``Σ_sites y ⊗ x`` in the kernel's own layout, computed as the vjp of
  the (bias-free) layer with respect to its kernel with ``y`` as cotangent; for a conv this is the
  correlation of the padded input with ``y`` (no im2col).
  """
  module_type: type
  fields: tuple

  @classmethod
  def of(cls, module: nn.Module, einsum_str: Optional[str] = None) -> 'Layer':
    """The geometry of a linen layer (``einsum_str``: an ``nn.Einsum`` call's own equation)."""
    fields = []
    for f in dataclasses.fields(module):
      if f.name in _IGNORED_FIELDS or not f.init:
        continue
      value = getattr(module, f.name)
      if f.name == 'mask' and value is not None:
        raise ValueError(f'{"/".join(module.path)}: GHL cannot read masked convolutions; leave it out of '
                         'the Rule\'s layers.')
      if f.name == 'einsum_str' and einsum_str is not None:
        value = einsum_str
      fields.append((f.name, _hashable(value)))
    return cls(type(module), tuple(fields))

  def __repr__(self):
    shown = ', '.join(f'{k}={v!r}' for k, v in self.fields if v is not None)
    return f'Layer({self.module_type.__name__}, {shown})'

  @property
  def is_conv(self) -> bool:
    """A convolution (``nn.Conv``): the paper's default selection."""
    return issubclass(self.module_type, nn.Conv)

  @property
  def is_dense(self) -> bool:
    """A plain dense layer (``nn.Dense``)."""
    return issubclass(self.module_type, nn.Dense)

  @property
  def is_general(self) -> bool:
    """A general linear layer read as the dense layer it is (:mod:`ghl_jax.linear_view`)."""
    return issubclass(self.module_type, (nn.DenseGeneral, nn.Einsum))

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

  def fan_in(self, x_shape: tuple) -> int:
    """Inputs of one neuron: ``prod(kernel_size)·C_in / groups`` (conv), else ``C_in``."""
    if not self.is_conv:
      return x_shape[-1]
    fields = dict(self.fields)
    size = fields['kernel_size']
    size = size if isinstance(size, tuple) else (size,)
    return math.prod(size) * x_shape[-1] // fields.get('feature_group_count', 1)

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
    if not self.is_general:
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


class Unsupported(NamedTuple):
  """A layer with a kernel GHL cannot read: its class name and why."""
  type_name: str
  reason: str


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _nnx_conv(module, call: Mapping) -> Layer:
  del call
  fields = {'features': module.out_features, 'kernel_size': _tuple(module.kernel_size),
            'strides': _tuple(module.strides), 'padding': _tuple(module.padding),
            'kernel_dilation': _tuple(module.kernel_dilation)}
  if isinstance(module, nnx.ConvTranspose):
    return Layer(nn.ConvTranspose, tuple(dict(fields, transpose_kernel=module.transpose_kernel).items()))
  fields.update(input_dilation=_tuple(module.input_dilation), feature_group_count=module.feature_group_count)
  return Layer(nn.Conv, tuple(fields.items()))


def _nnx_linear(module, call: Mapping) -> Layer:
  del call
  return Layer(nn.Dense, (('features', module.out_features),))


def _nnx_linear_general(module, call: Mapping) -> Layer:
  del call
  return Layer(nn.DenseGeneral, (('features', tuple(module.out_features)), ('axis', tuple(module.axis)),
                                 ('batch_dims', tuple(sorted(module.batch_axis)))))


def _nnx_einsum(module, call: Mapping) -> Layer:
  equation = call.get('einsum_str') or module.einsum_str
  return Layer(nn.Einsum, (('shape', tuple(module.kernel_shape)), ('einsum_str', equation)))


def _linen(module, call: Mapping) -> Layer:
  return Layer.of(module, einsum_str=call.get('einsum_str'))


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One layer type: its linen class, its NNX class and how a call reads as a :class:`Layer`."""
  linen: type
  nnx: type
  read_nnx: Callable


ADAPTERS = (
    Adapter(nn.Conv, nnx.Conv, _nnx_conv),
    Adapter(nn.ConvTranspose, nnx.ConvTranspose, _nnx_conv),
    Adapter(nn.Dense, nnx.Linear, _nnx_linear),
    Adapter(nn.DenseGeneral, nnx.LinearGeneral, _nnx_linear_general),
    Adapter(nn.Einsum, nnx.Einsum, _nnx_einsum),
)
UNSUPPORTED = {nn.ConvLocal: 'unshared weights: one kernel per output position'}
LINEN_TYPES = tuple(a.linen for a in ADAPTERS)
NNX_TYPES = tuple(a.nnx for a in ADAPTERS)


def _call_kwargs(args: tuple, kwargs: Mapping) -> dict:
  """The call-time settings a layer's geometry depends on (``nn.Einsum``'s ``einsum_str``)."""
  call = dict(kwargs)
  if len(args) > 1 and isinstance(args[1], str):
    call['einsum_str'] = args[1]
  return call


def read(module: Any, args: tuple = (), kwargs: Optional[Mapping] = None) -> Optional[Layer | Unsupported]:
  """The :class:`Layer` of one call ``module(*args, **kwargs)`` of a linen or NNX layer;
  :class:`Unsupported` for a module that owns a kernel GHL cannot read; ``None`` for any other."""
  call = _call_kwargs(args, kwargs or {})
  if isinstance(module, LINEN_TYPES):
    return _linen(module, call)
  for adapter in ADAPTERS:
    if isinstance(module, adapter.nnx):
      return adapter.read_nnx(module, call)
  if isinstance(module, nn.Module) and module.has_variable('params', 'kernel'):
    reason = next((why for cls, why in UNSUPPORTED.items() if isinstance(module, cls)), 'no adapter for this type')
    return Unsupported(type(module).__name__, reason)
  if isinstance(module, nnx.Module) and isinstance(getattr(module, 'kernel', None), nnx.Param):
    return Unsupported(type(module).__name__, 'no adapter for this type')
  return None


def is_linen_layer(module) -> bool:
  """Whether ``module`` is a linen layer of :data:`ADAPTERS`."""
  return isinstance(module, LINEN_TYPES)


# ------------------------------------------------------------------------------------------------
# Where the CPU kernels plug in (used by ghl_jax.accel and the fused path).

def conv_kind(module) -> Optional[str]:
  """``'linen'`` / ``'nnx'`` for a convolution whose ``conv_general_dilated`` can be swapped for the
  CPU kernels (an ``nn.Conv`` / ``nnx.Conv`` with lax's own), else ``None``."""
  if isinstance(module, nn.Conv):
    own = module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None
    return None if own else 'linen'
  if isinstance(module, nnx.Conv):
    return 'nnx' if module.conv_general_dilated is jax.lax.conv_general_dilated else None
  return None


def brings_own_conv(module) -> bool:
  """An ``nn.Conv`` with its own ``conv_general_dilated`` (its convolution is left alone)."""
  return isinstance(module, nn.Conv) and conv_kind(module) is None


def swappable_dot(module) -> bool:
  """An ``nn.Dense`` / ``nn.DenseGeneral`` with lax's own ``dot_general`` (swappable for the CPU's)."""
  return (isinstance(module, (nn.Dense, nn.DenseGeneral))
          and module.dot_general is None and module.dot_general_cls is None)


def is_batch_norm(module) -> bool:
  """A linen ``nn.BatchNorm`` (the Hebbian baselines' probe keeps its running averages)."""
  return isinstance(module, nn.BatchNorm)
