"""Convolutions whose backward pass is two GEMMs over patches (fast where XLA's is slow),
optionally returning a caller's term computed over the same patches.

For channels-last convolutions (NHWC·HWIO and their N-d analogues, the form ``nn.Conv`` calls),
with ``P`` the input patches (one row per site = sample × output position; columns = kernel taps
× input channels, the order of ``kernel.reshape(-1, features)``) and ``δ`` the output cotangent::

    u  = P W                   forward: XLA's own convolution (fast on every backend)
    ∂W = Pᵀ δ                  one GEMM
    ∂x = col2im(δ Wᵀ)          one GEMM; each tap's column block is added back at its offset

``P`` is rebuilt from ``x`` in the backward pass, so nothing bigger than ``x`` is kept between the
passes. In bfloat16 (XLA:CPU reaches its bf16 GEMM peak only with float32 accumulation, in row-major
``(M, K)·(K, N)`` form, and rounds after every bf16 elementwise op) the forward pass is ``P W`` too,
``∂x = Σ_t place_t(δ W_tᵀ)`` (one GEMM per tap, summed in float32) and ``∂W = Pᵀ δ`` is taken from
the channel-major ``Pᵀ`` (sliced from ``x`` moved to channels-first), each accumulated in float32.
On XLA:CPU this replaces backward convolutions that run at a fraction of the matmul peak (and
10-40× slower still inside ``lax.scan`` bodies: jax-ml/jax#12868).

:func:`conv_with_term` also hands the caller ``product(c) = Pᵀ c`` over the patches it builds
anyway and returns the caller's ``term(...)`` as the cotangent of a zero ``probe``: in the backward
pass beside ``∂W`` (``u`` kept for it), or in the forward pass where ``u = P W`` is computed from
the same patches (only the term is kept: the choice for ``lax.scan`` bodies, where whatever the
backward pass needs is stacked per block). This module knows no rule: the term is the caller's.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ghl_jax.kernels.matmul import dot as _dot
from ghl_jax.kernels.matmul import low_precision


class Geometry(NamedTuple):
  """A channels-last convolution: per spatial axis strides, ``(low, high)`` zero padding and
  kernel dilation; feature groups; the precision of the products."""
  strides: tuple
  padding: tuple
  dilation: tuple
  groups: int
  precision: object = None

  @property
  def dimension_numbers(self):
    n = len(self.strides)
    return lax.ConvDimensionNumbers((0, n + 1) + tuple(range(1, n + 1)),
                                    (n + 1, n) + tuple(range(n)),
                                    (0, n + 1) + tuple(range(1, n + 1)))

  def out_spatial(self, in_spatial, kernel_spatial) -> tuple:
    return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1 for size, (lo, hi), k, s, d
                 in zip(in_spatial, self.padding, kernel_spatial, self.strides, self.dilation))


def _xla_conv(x, kernel, geometry: Geometry):
  return lax.conv_general_dilated(x, kernel, geometry.strides, geometry.padding,
                                  rhs_dilation=geometry.dilation,
                                  dimension_numbers=geometry.dimension_numbers,
                                  feature_group_count=geometry.groups, precision=geometry.precision)


def _tap_offsets(kernel_spatial) -> list:
  return list(itertools.product(*(range(k) for k in kernel_spatial)))


def _tap_slices(x, kernel_spatial, geometry: Geometry, first: int) -> list:
  """``x`` (spatial axes from ``first`` on, then ``len(kernel_spatial)`` of them) zero-padded and
  sliced at every kernel offset: one ``(..., *out_spatial, ...)`` view per tap."""
  n = len(kernel_spatial)
  spatial = x.shape[first:first + n]
  out = geometry.out_spatial(spatial, kernel_spatial)
  keep = [(0, 0, 0)] * first
  rest = [(0, 0, 0)] * (x.ndim - first - n)
  xp = lax.pad(x, jnp.zeros((), x.dtype), keep + [(lo, hi, 0) for lo, hi in geometry.padding] + rest)
  pieces = []
  for offset in _tap_offsets(kernel_spatial):
    start = [o * d for o, d in zip(offset, geometry.dilation)]
    limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, out, geometry.strides)]
    pieces.append(lax.slice(xp, (0,) * first + tuple(start) + (0,) * len(rest),
                            x.shape[:first] + tuple(limit) + x.shape[first + n:],
                            (1,) * first + tuple(geometry.strides) + (1,) * len(rest)))
  return pieces


def patches(x, kernel_spatial, geometry: Geometry) -> jax.Array:
  """``P`` as ``(batch, *out_spatial, taps·channels)``: the padded input at every kernel offset."""
  pieces = _tap_slices(x, kernel_spatial, geometry, 1)
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def patch_matrix_t(x, kernel_spatial, geometry: Geometry) -> jax.Array:
  """``Pᵀ`` as ``(taps·channels, sites)``, sliced from the channel-major input: the layout in which
  ``Pᵀ c`` is a row-major GEMM (on XLA:CPU the only one that reaches the bfloat16 peak)."""
  pieces = _tap_slices(jnp.moveaxis(x, -1, 0), kernel_spatial, geometry, 2)
  return jnp.stack(pieces).reshape(len(pieces) * x.shape[-1], -1)


def _place(piece, offset, in_shape, geometry: Geometry) -> jax.Array:
  """One tap's ``(batch, *out, C)`` block added back at its offset: zero-padded to ``in_shape``."""
  config = [(0, 0, 0)]
  for o, d, (lo, _), m, s, size in zip(offset, geometry.dilation, geometry.padding, piece.shape[1:-1],
                                       geometry.strides, in_shape[1:-1]):
    low = o * d - lo
    config.append((low, size - low - (m - 1) * s - 1, s - 1))
  return lax.pad(piece, jnp.zeros((), piece.dtype), config + [(0, 0, 0)])


def col2im(cols, in_shape, kernel_spatial, geometry: Geometry) -> jax.Array:
  """Adjoint of :func:`patches`: ``cols (batch, *out, taps·C)`` summed back into ``in_shape``."""
  channels = in_shape[-1]
  pieces = (_place(cols[..., t * channels:(t + 1) * channels], offset, in_shape, geometry)
            for t, offset in enumerate(_tap_offsets(kernel_spatial)))
  return functools.reduce(jnp.add, pieces)


def _grouped(a, groups: int):
  """``(sites, G·K)`` → ``(G, sites, K)``."""
  return a.reshape(a.shape[0], groups, -1).transpose(1, 0, 2)


def patch_matrix(x, kernel_spatial, geometry: Geometry) -> jax.Array:
  """``P`` as ``(sites, taps·channels)``."""
  cols = patches(x, kernel_spatial, geometry)
  return cols.reshape(-1, cols.shape[-1])


def patch_product(cols, cotangent, kernel_shape, geometry: Geometry, accumulate=None) -> jax.Array:
  """``Pᵀ c`` in the kernel's shape (``Σ_sites c ⊗ patch``, within each feature group)."""
  features = kernel_shape[-1]
  c = cotangent.reshape(-1, features)
  if cols.dtype != c.dtype:
    c = c.astype(cols.dtype)
  g = geometry.groups
  if g == 1:
    product = _dot(cols, c, (((0,), (0,)), ((), ())), geometry.precision, accumulate)
    return product.reshape(kernel_shape)
  per_group = kernel_shape[-2]
  taps = cols.shape[-1] // (g * per_group)
  cols = cols.reshape(-1, taps, g, per_group).transpose(2, 0, 1, 3).reshape(g, cols.shape[0], -1)
  product = _dot(cols, _grouped(c, g), (((1,), (1,)), ((0,), (0,))), geometry.precision, accumulate)
  product = product.reshape(g, taps, per_group, features // g).transpose(1, 2, 0, 3)
  return product.reshape(kernel_shape)


def patch_apply(cols, kernel, out_shape, geometry: Geometry) -> jax.Array:
  """``u = P W`` (within each feature group) in ``out_shape``: the convolution as one GEMM."""
  features = kernel.shape[-1]
  g = geometry.groups
  if g == 1:
    u = _dot(cols, kernel.reshape(-1, features), (((1,), (0,)), ((), ())), geometry.precision)
    return u.reshape(out_shape)
  per_group = kernel.shape[-2]
  taps = cols.shape[-1] // (g * per_group)
  cols = cols.reshape(-1, taps, g, per_group).transpose(2, 0, 1, 3).reshape(g, cols.shape[0], -1)
  w = kernel.reshape(taps, per_group, g, features // g).transpose(2, 0, 1, 3).reshape(g, -1, features // g)
  u = _dot(cols, w, (((2,), (1,)), ((0,), (0,))), geometry.precision)
  return u.transpose(1, 0, 2).reshape(out_shape)


def _input_grad_by_tap(delta, kernel, out_shape, in_shape, geometry: Geometry) -> jax.Array:
  """``∂x = Σ_t place_t(δ W_tᵀ)``: one float32-accumulated GEMM per kernel tap, summed in
  float32 (XLA:CPU rounds every bfloat16 add; one wide GEMM into ``(sites, taps·C)`` runs below
  the bfloat16 peak)."""
  pieces = (_place(_dot(delta, kernel[offset], (((1,), (1,)), ((), ())), geometry.precision,
                        jnp.float32).reshape(out_shape + (-1,)), offset, in_shape, geometry)
            for offset in _tap_offsets(kernel.shape[:-2]))
  return functools.reduce(jnp.add, pieces)


def input_grad(cotangent, kernel, in_shape, geometry: Geometry) -> jax.Array:
  """``∂x = col2im(δ Wᵀ)``."""
  kernel_spatial = kernel.shape[:-2]
  features = kernel.shape[-1]
  g = geometry.groups
  delta = cotangent.reshape(-1, features)
  if g == 1 and low_precision(delta.dtype):
    return _input_grad_by_tap(delta, kernel, cotangent.shape[:-1], in_shape, geometry)
  if g == 1:
    cols = _dot(delta, kernel.reshape(-1, features), (((1,), (1,)), ((), ())), geometry.precision)
  else:
    w = kernel.reshape(-1, g, features // g).transpose(1, 0, 2)           # (G, taps·Cg, Fg)
    wide = jnp.float32 if low_precision(delta.dtype) else None            # col2im in float32
    cols = _dot(_grouped(delta, g), w, (((2,), (2,)), ((0,), (0,))),
                geometry.precision, wide)                                 # (G, sites, taps·Cg)
    taps = cols.shape[-1] // kernel.shape[-2]
    cols = cols.reshape(g, -1, taps, kernel.shape[-2]).transpose(1, 2, 0, 3)
  cols = cols.reshape(cotangent.shape[:-1] + (-1,))
  return col2im(cols, in_shape, kernel_spatial, geometry)


def _patch_conv(x, kernel, cols, geometry: Geometry) -> jax.Array:
  """``u = P W`` from ``x``'s patches ``cols``, in the convolution's output shape."""
  out_shape = (x.shape[0],) + geometry.out_spatial(x.shape[1:-1], kernel.shape[:-2]) + kernel.shape[-1:]
  return patch_apply(cols, kernel, out_shape, geometry)


def _unpadded_window(kernel_spatial, geometry: Geometry) -> bool:
  """A window wider than one site with no zero padding: typically an input padded beforehand
  (``padding='REFLECT'``/``'CIRCULAR'``), for which XLA:CPU's convolution runs 1.3–2.6× slower
  than ``P W`` (measured on SoftHebb's three layers, ``benchmarks/RESULTS.md``)."""
  return any(k > 1 for k in kernel_spatial) and all(p == (0, 0) for p in geometry.padding)


def _forward(x, kernel, geometry: Geometry) -> jax.Array:
  """``u``: XLA's convolution, or ``P W`` (accumulated in float32) where XLA:CPU's is slower: in
  low precision (its bfloat16 convolution runs below its float32 one) and for unpadded windows."""
  if not low_precision(x.dtype) and not _unpadded_window(kernel.shape[:-2], geometry):
    return _xla_conv(x, kernel, geometry)
  return _patch_conv(x, kernel, patch_matrix(x, kernel.shape[:-2], geometry), geometry)


def _products(x, kernel_shape, geometry: Geometry, cols=None) -> Callable:
  """``c ↦ Pᵀ c`` (float32, in the kernel's shape) over ``x``'s patches: in low precision from the
  channel-major ``Pᵀ``, else from ``P`` (``cols`` if given)."""
  if low_precision(x.dtype) and geometry.groups == 1:
    cols_t = patch_matrix_t(x, kernel_shape[:-2], geometry)
    return lambda c: _dot(cols_t, c.reshape(-1, kernel_shape[-1]).astype(x.dtype),
                          (((1,), (0,)), ((), ())), geometry.precision,
                          jnp.float32).reshape(kernel_shape)
  cols = patch_matrix(x, kernel_shape[:-2], geometry) if cols is None else cols
  return lambda c: patch_product(cols, c, kernel_shape, geometry, accumulate=jnp.float32)


def _conv_grads(geometry, x, kernel, product, cotangent):
  dx = input_grad(cotangent, kernel, x.shape, geometry).astype(x.dtype)
  return dx, product(cotangent).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemm_conv(x, kernel, geometry):
  return _forward(x, kernel, geometry)


def _gemm_conv_fwd(x, kernel, geometry):
  return _forward(x, kernel, geometry), (x, kernel)


def _gemm_conv_bwd(geometry, residuals, cotangent):
  x, kernel = residuals
  return _conv_grads(geometry, x, kernel, _products(x, kernel.shape, geometry), cotangent)


_gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def _channels_last(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None:
    return False
  if not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    dimension_numbers = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  n = ndim - 2
  return dimension_numbers == Geometry((1,) * n, ((0, 0),) * n, (1,) * n, 1).dimension_numbers


def geometry_of(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                batch_group_count=1, precision=None) -> Optional[Geometry]:
  """The :class:`Geometry` of a ``lax.conv_general_dilated`` call, or ``None`` when the GEMM
  path does not cover it (not channels-last, input dilation, batch groups, negative padding)."""
  n = len(lhs_shape) - 2
  ones = (1,) * n
  if (not _channels_last(dimension_numbers, len(lhs_shape)) or batch_group_count != 1
      or tuple(lhs_dilation or ones) != ones):
    return None
  strides = tuple(window_strides or ones)
  dilation = tuple(rhs_dilation or ones)
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:n], dilation)]
    padding = lax.padtype_to_pads(lhs_shape[1:-1], dilated, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    return None
  geometry = Geometry(strides, padding, dilation, int(feature_group_count), precision)
  if min(geometry.out_spatial(lhs_shape[1:-1], rhs_shape[:n]), default=1) < 1:
    return None
  return geometry


def conv_general_dilated(lhs, rhs, window_strides=None, padding='VALID', lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` with the GEMM backward pass where it applies (else XLA's)."""
  geometry = geometry_of(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count, precision)
  if geometry is None or preferred_element_type is not None or lhs.dtype != rhs.dtype:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  return _gemm_conv(lhs, rhs, geometry)


def _zeros(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _term(term, context, x, kernel, u, product) -> jax.Array:
  return lax.stop_gradient(term(context, x, kernel, u, product)).astype(jnp.float32)


def _anchor() -> jax.Array:
  return jnp.zeros((), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv_with_term(x, kernel, probe, context, geometry, term, forward):
  del probe, context, term, forward
  return _forward(x, kernel, geometry), _anchor()


def _conv_with_term_fwd(x, kernel, probe, context, geometry, term, forward):
  del probe
  if not forward:
    u = _forward(x, kernel, geometry)
    return (u, _anchor()), (x, kernel, u, context)
  cols = patch_matrix(x, kernel.shape[:-2], geometry)
  u = _patch_conv(x, kernel, cols, geometry)
  product = _products(x, kernel.shape, geometry, cols)
  return (u, _anchor()), (x, kernel, _term(term, context, x, kernel, u, product), context)


def _conv_with_term_bwd(geometry, term, forward, residuals, cotangents):
  """``∂x``, ``∂W`` and, as the probe's cotangent, the term (formed here unless ``forward``)."""
  cotangent, _ = cotangents
  x, kernel, kept, context = residuals
  product = _products(x, kernel.shape, geometry)
  dx, dw = _conv_grads(geometry, x, kernel, product, cotangent)
  h = kept if forward else _term(term, context, x, kernel, kept, product)
  return dx, dw, h, _zeros(context)


_conv_with_term.defvjp(_conv_with_term_fwd, _conv_with_term_bwd)


def conv_with_term(lhs, rhs, geometry: Geometry, *, probe, context, term: Callable,
                   forward: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(u, anchor)``: the convolution of ``lhs`` and ``rhs`` (GEMM backward) whose ``probe`` gets as
  cotangent ``term(context, x, kernel, u, product)``, float32, with ``product(c) = Pᵀ c`` in the
  kernel's shape over this convolution's patches; ``context`` is a pytree passed through (zero
  cotangent). ``anchor`` is a zero scalar: added to the loss, it makes the backward pass form the
  term even when ``u`` does not reach the loss. ``forward``: form the term in the forward pass (see
  the module docstring)."""
  return _conv_with_term(lhs, rhs, probe, context, geometry, term, forward)
