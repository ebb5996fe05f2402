"""Convolutions whose backward pass is two GEMMs over patches (fast where XLA's is slow),
and GHL's Hebbian terms computed from the same patches.

:func:`conv_general_dilated` replaces ``lax.conv_general_dilated`` for channels-last convolutions
(NHWC·HWIO and their N-d analogues, the form ``nn.Conv`` calls). With ``P`` the input patches
(one row per site = sample × output position; columns = kernel taps × input channels, the
order of ``kernel.reshape(-1, features)``) and ``δ`` the output cotangent::

    u  = P W                   forward: XLA's own convolution (fast on every backend)
    ∂W = Pᵀ δ                  one GEMM
    ∂x = col2im(δ Wᵀ)          one GEMM; each tap's column block is added back at its offset

``P`` is rebuilt from ``x`` in the backward pass, so nothing bigger than ``x`` is kept between
the passes. On XLA:CPU this replaces backward convolutions that run at a fraction of the
matmul peak (and 10-40× slower still inside ``lax.scan`` bodies: jax-ml/jax#12868).

:func:`use` switches every ``nn.Conv`` called inside it to this function (through
``conv_general_dilated``, the hook ``nn.Conv`` provides), so models stay plain flax::

    with fast_conv.use('auto'):        # 'gemm' on CPU, XLA's conv elsewhere
      loss, grads = jax.value_and_grad(loss_fn)(params)

**Fused Hebbian terms.** Given rule settings, every conv whose params hold a *probe* (a zero
array beside its kernel, :func:`add_probes`) also returns its raw Hebbian term
``H = rule(x, u, W)`` as the gradient of that probe. The rule's ``Σ y ⊗ x`` is ``Pᵀ y`` over
patches the convolution builds anyway, so the Hebbian term never builds patches of its own:

* ``'hebbian_probe'`` (unstacked kernels): in the backward pass, beside ``∂W = Pᵀ δ`` (the
  same ``P``); ``u`` is kept for it, a buffer the backward pass of the layers after the conv
  keeps alive in any case;
* ``'hebbian_probe_forward'`` (kernels stacked by ``nn.scan``): in the forward pass, where the
  convolution is computed as ``u = P W``; only ``H`` is kept for the backward pass, since a
  scan stacks whatever the backward pass needs of every block (``u`` would add one
  activation-sized buffer per block).

With ``'xla'`` the probes work alike, the rule's ``Σ y ⊗ x`` being the layer's own
``kernel_product`` (the vjp of XLA's conv: no patches) after XLA's convolution.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Callable, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghl_jax.tap import Layer
from ghl_jax import transform

IMPLS = ('auto', 'xla', 'gemm')
PROBE = 'hebbian_probe'                    # H from the backward pass
PROBE_FORWARD = 'hebbian_probe_forward'    # H from the forward pass (stacked kernels)
PROBES = (PROBE, PROBE_FORWARD)


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


def patches(x, kernel_spatial, geometry: Geometry) -> jax.Array:
  """``P`` as ``(batch, *out_spatial, taps·channels)``: the padded input at every kernel offset."""
  out = geometry.out_spatial(x.shape[1:-1], kernel_spatial)
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in geometry.padding]
               + [(0, 0, 0)])
  pieces = []
  for offset in _tap_offsets(kernel_spatial):
    start = [o * d for o, d in zip(offset, geometry.dilation)]
    limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, out, geometry.strides)]
    pieces.append(lax.slice(xp, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                            (1, *geometry.strides, 1)))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def col2im(cols, in_shape, kernel_spatial, geometry: Geometry) -> jax.Array:
  """Adjoint of :func:`patches`: ``cols (batch, *out, taps·C)`` summed back into ``in_shape``."""
  channels = in_shape[-1]
  out = cols.shape[1:-1]
  total = None
  for t, offset in enumerate(_tap_offsets(kernel_spatial)):
    piece = cols[..., t * channels:(t + 1) * channels]
    config = [(0, 0, 0)]
    for o, d, (lo, _), m, s, size in zip(offset, geometry.dilation, geometry.padding, out,
                                         geometry.strides, in_shape[1:-1]):
      low = o * d - lo
      config.append((low, size - low - (m - 1) * s - 1, s - 1))
    placed = lax.pad(piece, jnp.zeros((), cols.dtype), config + [(0, 0, 0)])
    total = placed if total is None else total + placed
  return total


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
    cols, c = cols.astype(jnp.float32), c.astype(jnp.float32)
  g = geometry.groups
  if g == 1:
    product = lax.dot_general(cols, c, (((0,), (0,)), ((), ())), precision=geometry.precision,
                              preferred_element_type=accumulate)
    return product.reshape(kernel_shape)
  per_group = kernel_shape[-2]
  taps = cols.shape[-1] // (g * per_group)
  cols = cols.reshape(-1, taps, g, per_group).transpose(2, 0, 1, 3).reshape(g, cols.shape[0], -1)
  product = lax.dot_general(cols, _grouped(c, g), (((1,), (1,)), ((0,), (0,))),
                            precision=geometry.precision, preferred_element_type=accumulate)
  product = product.reshape(g, taps, per_group, features // g).transpose(1, 2, 0, 3)
  return product.reshape(kernel_shape)


def patch_apply(cols, kernel, out_shape, geometry: Geometry) -> jax.Array:
  """``u = P W`` (within each feature group) in ``out_shape``: the convolution as one GEMM."""
  features = kernel.shape[-1]
  g = geometry.groups
  if g == 1:
    u = lax.dot_general(cols, kernel.reshape(-1, features), (((1,), (0,)), ((), ())),
                        precision=geometry.precision)
    return u.reshape(out_shape)
  per_group = kernel.shape[-2]
  taps = cols.shape[-1] // (g * per_group)
  cols = cols.reshape(-1, taps, g, per_group).transpose(2, 0, 1, 3).reshape(g, cols.shape[0], -1)
  w = kernel.reshape(taps, per_group, g, features // g).transpose(2, 0, 1, 3).reshape(g, -1, features // g)
  u = lax.dot_general(cols, w, (((2,), (1,)), ((0,), (0,))), precision=geometry.precision)
  return u.transpose(1, 0, 2).reshape(out_shape)


def input_grad(cotangent, kernel, in_shape, geometry: Geometry) -> jax.Array:
  """``∂x = col2im(δ Wᵀ)``."""
  kernel_spatial = kernel.shape[:-2]
  features = kernel.shape[-1]
  g = geometry.groups
  delta = cotangent.reshape(-1, features)
  if g == 1:
    cols = lax.dot_general(delta, kernel.reshape(-1, features), (((1,), (1,)), ((), ())),
                           precision=geometry.precision)
  else:
    w = kernel.reshape(-1, g, features // g).transpose(1, 0, 2)           # (G, taps·Cg, Fg)
    cols = lax.dot_general(_grouped(delta, g), w, (((2,), (2,)), ((0,), (0,))),
                           precision=geometry.precision)                  # (G, sites, taps·Cg)
    taps = cols.shape[-1] // kernel.shape[-2]
    cols = cols.reshape(g, -1, taps, kernel.shape[-2]).transpose(1, 2, 0, 3)
  cols = cols.reshape(cotangent.shape[:-1] + (-1,))
  return col2im(cols, in_shape, kernel_spatial, geometry)


def _conv_grads(geometry, x, kernel, cols, cotangent):
  dx = input_grad(cotangent, kernel, x.shape, geometry).astype(x.dtype)
  dw = patch_product(cols, cotangent, kernel.shape, geometry, accumulate=jnp.float32)
  return dx, dw.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemm_conv(x, kernel, geometry):
  return _xla_conv(x, kernel, geometry)


def _gemm_conv_fwd(x, kernel, geometry):
  return _xla_conv(x, kernel, geometry), (x, kernel)


def _gemm_conv_bwd(geometry, residuals, cotangent):
  x, kernel = residuals
  return _conv_grads(geometry, x, kernel, patch_matrix(x, kernel.shape[:-2], geometry), cotangent)


_gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


class _SharedPatches:
  """A tapped :class:`~ghl_jax.tap.Layer` whose ``kernel_product`` is ``Pᵀ y`` over patches
  the convolution already built (the same sites, the same input)."""

  def __init__(self, layer, cols, geometry: Geometry):
    self._layer, self._cols, self._geometry = layer, cols, geometry

  def __getattr__(self, name):
    return getattr(self._layer, name)

  def kernel_product(self, x, y, kernel_shape):
    del x
    return patch_product(self._cols, y.astype(jnp.float32), tuple(kernel_shape), self._geometry,
                         accumulate=jnp.float32)


def _hebbian_term(rule, layer, geometry, cols, x, kernel, u, context) -> jax.Array:
  """``H = rule(x, u + b, W)`` of the module (its own input and kernel unless the conv saw
  others: dtype promotion, REFLECT/CIRCULAR padding), with ``Σ y ⊗ x = Pᵀ y`` over ``cols``."""
  outputs = u if context['bias'] is None else u + context['bias'].astype(u.dtype)
  inputs = x if context['inputs'] is None else context['inputs']
  weights = kernel if context['kernel'] is None else context['kernel']
  term = rule(inputs, outputs, weights, _SharedPatches(layer, cols, geometry))
  return lax.stop_gradient(term).astype(jnp.float32)


def _zeros(tree):
  return jax.tree.map(jnp.zeros_like, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _hebbian_conv(x, kernel, probe, context, geometry, layer, rule):
  del probe, context, layer, rule
  return _xla_conv(x, kernel, geometry)


def _hebbian_conv_fwd(x, kernel, probe, context, geometry, layer, rule):
  del probe, layer, rule
  u = _xla_conv(x, kernel, geometry)
  return u, (x, kernel, u, context)


def _hebbian_conv_bwd(geometry, layer, rule, residuals, cotangent):
  """``∂x``, ``∂W`` and, as the probe's cotangent, ``H`` over the patches of ``∂W = Pᵀ δ``."""
  x, kernel, u, context = residuals
  cols = patch_matrix(x, kernel.shape[:-2], geometry)
  dx, dw = _conv_grads(geometry, x, kernel, cols, cotangent)
  term = _hebbian_term(rule, layer, geometry, cols, x, kernel, u, context)
  return dx, dw, term, _zeros(context)


_hebbian_conv.defvjp(_hebbian_conv_fwd, _hebbian_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _hebbian_conv_forward(x, kernel, probe, context, geometry, layer, rule):
  del probe, context, layer, rule
  return _xla_conv(x, kernel, geometry)


def _hebbian_conv_forward_fwd(x, kernel, probe, context, geometry, layer, rule):
  """``u = P W`` and ``H`` over the same ``P``; the backward pass keeps ``x``, ``W``, ``H``."""
  del probe
  cols = patch_matrix(x, kernel.shape[:-2], geometry)
  out_shape = (x.shape[0],) + geometry.out_spatial(x.shape[1:-1], kernel.shape[:-2]) + kernel.shape[-1:]
  u = patch_apply(cols, kernel, out_shape, geometry)
  return u, (x, kernel, _hebbian_term(rule, layer, geometry, cols, x, kernel, u, context), context)


def _hebbian_conv_forward_bwd(geometry, layer, rule, residuals, cotangent):
  del layer, rule
  x, kernel, term, context = residuals
  cols = patch_matrix(x, kernel.shape[:-2], geometry)
  dx, dw = _conv_grads(geometry, x, kernel, cols, cotangent)
  return dx, dw, term, _zeros(context)


_hebbian_conv_forward.defvjp(_hebbian_conv_forward_fwd, _hebbian_conv_forward_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _hebbian_of_output(u, probe, context, layer, rule, forward):
  del probe, context, layer, rule, forward
  return u


def _hebbian_term_by_vjp(u, context, layer, rule) -> jax.Array:
  """``H`` by the layer's own ``kernel_product`` (the vjp of XLA's conv: no patches)."""
  outputs = u if context['bias'] is None else u + context['bias'].astype(u.dtype)
  term = rule(context['inputs'], outputs, context['kernel'], layer)
  return lax.stop_gradient(term).astype(jnp.float32)


def _hebbian_of_output_fwd(u, probe, context, layer, rule, forward):
  del probe
  if forward:
    return u, (_hebbian_term_by_vjp(u, context, layer, rule), _zeros(context))
  return u, (u, context)


def _hebbian_of_output_bwd(layer, rule, forward, residuals, cotangent):
  if forward:
    term, zeros = residuals
  else:
    u, context = residuals
    term, zeros = _hebbian_term_by_vjp(u, context, layer, rule), _zeros(context)
  return cotangent, term, zeros


_hebbian_of_output.defvjp(_hebbian_of_output_fwd, _hebbian_of_output_bwd)


def _hebbian_conv_general_dilated(lhs, rhs, window_strides=None, padding='VALID',
                                  lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                                  feature_group_count=1, batch_group_count=1, precision=None,
                                  preferred_element_type=None, *, probe, context, layer, rule,
                                  forward: bool, gemm: bool):
  """A convolution that also gives ``H = rule(x, u, W)`` as the cotangent of ``probe``, in its
  forward (``forward``) or backward pass: with ``gemm``, :func:`conv_general_dilated` with ``H``
  over its patches; else (or where the GEMM path does not apply) XLA's conv, then ``H`` by
  the layer's own vjp."""
  geometry = geometry_of(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count, precision)
  if not gemm or geometry is None or preferred_element_type is not None or lhs.dtype != rhs.dtype:
    u = lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                 dimension_numbers, feature_group_count, batch_group_count,
                                 precision, preferred_element_type)
    return _hebbian_of_output(u, probe, context, layer, rule, forward)
  # The conv's own operands when they are the module's (no second copy kept for the backward).
  context = dict(context, inputs=None if context['inputs'] is lhs else context['inputs'],
                 kernel=None if context['kernel'] is rhs else context['kernel'])
  conv = _hebbian_conv_forward if forward else _hebbian_conv
  return conv(lhs, rhs, probe, context, geometry, layer, rule)


def resolve(impl: str) -> str:
  """``'auto'`` → ``'gemm'`` on CPU, ``'xla'`` on GPU/TPU; ``'xla'``/``'gemm'`` as given."""
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'auto':
    return 'gemm' if jax.default_backend() == 'cpu' else 'xla'
  return impl


class HebbianRule(NamedTuple):
  """The rule settings of :func:`ghl_jax.hebbian_terms` (``rule``, ``t_inv``, ``rule_kwargs``)."""
  rule: object = 'softmax_oja'
  t_inv: object = 1.0
  rule_kwargs: Optional[dict] = None


def _conv_for(module, args, kwargs, gemm: bool, hebbian: Optional[HebbianRule]):
  """The convolution an ``nn.Conv`` call runs (``None``: its own): with a probe beside its
  kernel (see :func:`add_probes`), one that also returns the layer's Hebbian term."""
  probes = {name: module.get_variable('params', name) for name in PROBES} if hebbian else {}
  probe = probes.get(PROBE_FORWARD)
  forward = probe is not None
  if probe is None:
    probe = probes.get(PROBE)
  if probe is None:
    return conv_general_dilated if gemm else None
  path = '/'.join(module.path + ('kernel',))
  bias = module.get_variable('params', 'bias') if module.use_bias else None
  context = {'inputs': args[0] if args else kwargs['inputs'], 'bias': bias,
             'kernel': module.get_variable('params', 'kernel')}
  rule = transform._rule_fn(  # pylint: disable=protected-access
      hebbian.rule, path, hebbian.t_inv, hebbian.rule_kwargs)
  return functools.partial(_hebbian_conv_general_dilated, probe=probe, context=context,
                           layer=Layer.of(module), rule=rule, forward=forward, gemm=gemm)


def _interceptor(gemm: bool, hebbian: Optional[HebbianRule]):
  def swap_conv(next_fun, args, kwargs, context):
    """Runs an ``nn.Conv`` call with this module's convolution."""
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, nn.Conv):
      return next_fun(*args, **kwargs)
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
      if hebbian is not None and any(module.get_variable('params', p) is not None for p in PROBES):
        raise ValueError(f'{module.path}: a module with its own conv_general_dilated cannot give '
                         'fused Hebbian terms; compute them from taps (ghl_jax.hebbian_terms).')
      return next_fun(*args, **kwargs)
    conv = _conv_for(module, args, kwargs, gemm, hebbian)
    if conv is None:
      return next_fun(*args, **kwargs)
    object.__setattr__(module, 'conv_general_dilated', conv)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, 'conv_general_dilated', None)
  return swap_conv


@contextlib.contextmanager
def use(impl: str = 'auto', hebbian: Optional[HebbianRule] = None):
  """Inside: every ``nn.Conv`` call uses the convolution ``impl`` names (see :func:`resolve`).

  With ``hebbian`` rule settings, each conv whose params hold a probe (:func:`add_probes`)
  also returns its raw Hebbian term as the probe's gradient: over the conv's patches with
  'gemm', by the layer's vjp with 'xla'.
  """
  gemm = resolve(impl) == 'gemm'
  if not gemm and hebbian is None:
    yield
    return
  with nn.intercept_methods(_interceptor(gemm, hebbian)):
    yield


def wrap(fn: Callable, impl: str = 'auto', hebbian: Optional[HebbianRule] = None) -> Callable:
  """``fn`` (e.g. ``model.apply``) running under :func:`use` ``(impl, hebbian)``."""
  resolve(impl)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use(impl, hebbian):
      return fn(*args, **kwargs)
  return wrapped


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def add_probes(params, kernel_paths, forward=()) -> dict:
  """``params`` with a zero probe beside each kernel in ``kernel_paths``: under :func:`use`
  with rule settings, its gradient is the layer's raw Hebbian term, formed in the backward
  pass, or in the forward pass for the kernels also in ``forward`` (``'hebbian_probe_forward'``)."""
  flat = _flat(params)
  for path in kernel_paths:
    name = PROBE_FORWARD if path in forward else PROBE
    # zeros_like keeps the kernel's per-device type inside shard_map (a per-device term).
    flat[path[:-len('kernel')] + name] = jnp.zeros_like(flat[path], dtype=jnp.float32)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def pop_probes(grads) -> tuple[dict, dict]:
  """``(grads without probes, {kernel_path: raw Hebbian term})``."""
  flat = _flat(grads)
  terms = {}
  for path in list(flat):
    module, _, name = path.rpartition('/')
    if name in PROBES:
      terms[(module + '/' if module else '') + 'kernel'] = flat.pop(path)
  return flax.traverse_util.unflatten_dict(flat, sep='/'), terms


def fused_kernels(params, taps, layers=None) -> tuple[dict, tuple]:
  """``({conv kernel path: stacked axes}, other kernel paths)`` of the kernels GHL governs
  (``layers`` as in :func:`ghl_jax.ghl`): the convs get their terms from probes (formed in the
  forward pass for stacked kernels), the others (e.g. Dense kernels) from their taps."""
  selected = transform.selected_layers(taps, layers)
  flat = _flat(params)
  convs = {path: flat[path].ndim - entry['layer'].kernel_ndim
           for path, entry in selected.items() if entry['layer'].is_conv}
  return convs, tuple(path for path in selected if path not in convs)


def probed_params(params, convs: dict) -> dict:
  """``params`` with the probes of :func:`fused_kernels`' ``convs`` (stacked ones forward)."""
  return add_probes(params, convs, forward={path for path, stacked in convs.items() if stacked})


def fused_hebbian_terms(grads, params, taps, convs, others, ghl_kwargs: dict) -> tuple[dict, dict]:
  """``(grads, {kernel_path: Hebbian})`` from the gradients of params with probes on ``convs``
  (:func:`fused_kernels`); the ``others`` from their taps with :func:`ghl_jax.hebbian_terms`."""
  grads, terms = pop_probes(grads)
  if isinstance(params, flax.core.FrozenDict):
    grads = flax.core.freeze(grads)
  hebb = {}
  if others:
    hebb = transform.hebbian_terms(params, taps, **dict(ghl_kwargs, layers=others))
  for path, stacked in convs.items():
    hebb[path] = transform.Hebbian(terms[path], stacked)
  return grads, hebb


def hebbian_rule(ghl_kwargs: dict) -> HebbianRule:
  """The rule settings of the arguments of :func:`ghl_jax.hebbian_terms`."""
  return HebbianRule(ghl_kwargs.get('rule', 'softmax_oja'), ghl_kwargs.get('t_inv', 1.0),
                     ghl_kwargs.get('rule_kwargs'))
