"""``value_and_grad(fun, rule)``: gradients and GHL's raw Hebbian terms from one backward pass.

::

    grad_fn = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True)    # loss_fn calls model.apply
    (loss, aux), grads, hebb = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, hebb=hebb)

``hebb`` maps every kernel the rule selects (by its '/'-joined path in the differentiated
argument) to a :class:`ghl_jax.Hebbian`: the raw term ``H = rule(x, u, W)`` of that layer on
this call's data, float32, summed over the layer's calls, not normalised (raw terms add up over
micro-batches and devices; ``ghl()`` normalises).

How: a zero *probe* is added beside each selected kernel; an interceptor makes each selected
layer return its term as the probe's gradient. For an ``nn.Conv`` on the GEMM kernels
(:mod:`ghl_jax.accel`, the CPU default) the rule's ``Σ y ⊗ x`` is ``Pᵀ y`` over the patches that
``∂W = Pᵀ δ`` builds anyway; everywhere else (``nn.Dense``, XLA's convolutions) the term is the
rule on the layer's own input and output, its products the vjp of the layer. Kernels stacked
by ``nn.scan`` form their term in the forward pass (a scan keeps only ``H`` per block, not ``u``).

Correct for every rule by construction: the shared-patch product is used only when the rule asks
for ``Σ y ⊗ x`` of the layer's own input; for anything else (``kernel_product(f(x), y)``) it
is the layer's exact vjp.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ghl_jax import accel
from ghl_jax import kernels
from ghl_jax import tap as tap_lib
from ghl_jax.rule import Rule
from ghl_jax.transform import Hebbian

PROBE = 'hebbian_probe'                    # H formed in the backward pass
PROBE_FORWARD = 'hebbian_probe_forward'    # H formed in the forward pass (stacked kernels)
PROBES = (PROBE, PROBE_FORWARD)


# ------------------------------------------------------------------------------------------------
# Probes: zero arrays beside kernels whose gradients are the Hebbian terms.

def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat_like(template, flat: dict):
  tree = flax.traverse_util.unflatten_dict(flat, sep='/')
  return flax.core.freeze(tree) if isinstance(template, flax.core.FrozenDict) else tree


def add_probes(params, kernel_paths: Sequence[str], forward: Sequence[str] = ()):
  """``params`` with a zero float32 probe beside each kernel in ``kernel_paths`` (named
  ``'hebbian_probe_forward'`` for the paths also in ``forward``, else ``'hebbian_probe'``)."""
  flat = _flat(params)
  for path in kernel_paths:
    name = PROBE_FORWARD if path in forward else PROBE
    # zeros_like keeps the kernel's per-device type inside shard_map (a per-device term).
    flat[path[:-len('kernel')] + name] = jnp.zeros_like(flat[path], dtype=jnp.float32)
  return _unflat_like(params, flat)


def pop_probes(grads) -> tuple[Any, dict]:
  """``(grads without probes, {kernel_path: probe gradient})``."""
  flat = _flat(grads)
  terms = {}
  for path in list(flat):
    module, _, name = path.rpartition('/')
    if name in PROBES:
      terms[(module + '/' if module else '') + 'kernel'] = flat.pop(path)
  return _unflat_like(grads, flat), terms


# ------------------------------------------------------------------------------------------------
# Terms inside the layers.

class _PatchLayer:
  """A :class:`ghl_jax.tap.Layer` whose ``kernel_product`` of the layer's own input is ``Pᵀ y``
  over the convolution's patches; of any other array, the layer's exact vjp."""

  def __init__(self, layer: tap_lib.Layer, own_inputs: tuple, product: Callable):
    self._layer, self._own, self._product = layer, own_inputs, product

  def __getattr__(self, name):
    return getattr(self._layer, name)

  def kernel_product(self, x, y, kernel_shape):
    if any(x is own for own in self._own):
      return self._product(y)
    return self._layer.kernel_product(x, y, kernel_shape)


def _no_grad_term(term) -> jax.Array:
  return lax.stop_gradient(term).astype(jnp.float32)


def _zeros(tree):
  return jax.tree.map(jnp.zeros_like, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def with_term(u, probe, context, term, forward):
  """``u`` unchanged; ``probe``'s cotangent is ``term(context, u)`` (no cotangent to context)."""
  del probe, context, term, forward
  return u


def _with_term_fwd(u, probe, context, term, forward):
  del probe
  if forward:
    return u, (_no_grad_term(term(context, u)), _zeros(context))
  return u, (u, context)


def _with_term_bwd(term, forward, residuals, cotangent):
  if forward:
    h, zeros = residuals
  else:
    u, context = residuals
    h, zeros = _no_grad_term(term(context, u)), _zeros(context)
  return cotangent, h, zeros


with_term.defvjp(_with_term_fwd, _with_term_bwd)


def layer_term(rule_term, layer):
  """``(context, u) -> rule(x, u, W, layer)`` on the module's own input and output (general
  linear layers as the dense layer they are, :meth:`ghl_jax.tap.Layer.term`)."""
  return lambda context, u: layer.term(rule_term, context['inputs'], u, context['kernel'])


def _patch_term(rule_term, layer):
  """The term of :func:`ghl_jax.kernels.conv.conv_with_term`: ``rule(x, u + b, W, patch layer)``
  on the module's input, kernel and output (the conv's operands when the module passed its own)."""
  def term(context, x, kernel, u, product):
    outputs = u if context['bias'] is None else u + context['bias'].astype(u.dtype)
    inputs = x if context['inputs'] is None else context['inputs']
    weights = kernel if context['kernel'] is None else context['kernel']
    inputs32 = inputs.astype(jnp.float32)
    return rule_term(inputs32, outputs, weights, _PatchLayer(layer, (inputs, inputs32), product))
  return term


def _conv_with_patch_term(lhs, rhs, window_strides=None, padding='VALID', lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          batch_group_count=1, precision=None, preferred_element_type=None, *,
                          probe, context, term, forward: bool):
  """``nn.Conv``'s convolution on the GEMM kernels, its term over the same patches."""
  geometry = kernels.conv.geometry_of(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      batch_group_count, precision)
  if geometry is None or preferred_element_type is not None or lhs.dtype != rhs.dtype:
    return None
  # The conv's own operands when they are the module's: no second copy kept for the backward.
  context = dict(context, inputs=None if context['inputs'] is lhs else context['inputs'],
                 kernel=None if context['kernel'] is rhs else context['kernel'])
  return kernels.conv.conv_with_term(lhs, rhs, geometry, probe=probe, context=context, term=term,
                                     forward=forward)


def conv_with_patch_term(probe, forward: bool, inputs, kernel, bias, rule_term, layer) -> tuple:
  """``(conv, attached)``: a ``conv_general_dilated`` for one conv layer's call that runs on the
  GEMM kernels with ``rule_term`` over the same patches as ``probe``'s cotangent, and a list that is
  non-empty once it did; outside the kernels (e.g. input dilation) XLA's convolution, no term."""
  conv = functools.partial(_conv_with_patch_term, probe=probe, forward=forward,
                           context={'inputs': inputs, 'bias': bias, 'kernel': kernel},
                           term=_patch_term(rule_term, layer))
  attached = []

  def conv_or_xla(*conv_args, out_sharding=None, **conv_kwargs):
    out = conv(*conv_args, **conv_kwargs) if out_sharding is None else None
    if out is None:
      sharding = {} if out_sharding is None else {'out_sharding': out_sharding}
      return lax.conv_general_dilated(*conv_args, **conv_kwargs, **sharding)
    attached.append(True)
    return out
  return conv_or_xla, attached


def _interceptor(rule: Rule, gemm: bool, types: tuple):
  """Selected layers (those with a probe) return their term as the probe's gradient."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, types):
      return next_fun(*args, **kwargs)
    probes = {name: module.get_variable('params', name) for name in PROBES}
    forward = probes[PROBE_FORWARD] is not None
    probe = probes[PROBE_FORWARD] if forward else probes[PROBE]
    if probe is None:
      return next_fun(*args, **kwargs)
    is_conv = isinstance(module, nn.Conv)
    if is_conv and accel.has_own_conv(module):
      raise ValueError(f'{"/".join(module.path)}: a conv with its own conv_general_dilated cannot give '
                       'fused Hebbian terms; leave it out of the rule\'s layers or use ghl_jax.tap.')
    inputs = args[0] if args else kwargs['inputs']
    kernel = module.get_variable('params', 'kernel')
    layer = tap_lib.Layer.of(module)
    rule_term = rule.term('/'.join(module.path + ('kernel',)))
    if is_conv and gemm:
      bias = module.get_variable('params', 'bias') if module.use_bias else None
      conv_or_xla, attached = conv_with_patch_term(probe, forward, inputs, kernel, bias, rule_term, layer)
      with accel.conv_hook(module, conv_or_xla):
        u = next_fun(*args, **kwargs)
      if attached:
        return u
    else:
      u = next_fun(*args, **kwargs)
    return with_term(u, probe, {'inputs': inputs, 'kernel': kernel}, layer_term(rule_term, layer),
                      forward)
  return intercept


@contextlib.contextmanager
def use(rule: Rule, conv_impl: str = 'auto'):
  """Inside: every layer whose params hold a probe (:func:`add_probes`) returns its raw term of
  ``rule`` as the probe's gradient; every other layer runs on the kernels of ``conv_impl``."""
  gemm = accel.resolve(conv_impl) == 'gemm'
  # The fused interceptor sees each call before the seam's (outer interceptors run first).
  with nn.intercept_methods(_interceptor(rule, gemm, tap_lib.TAPPED_TYPES)), accel.use(conv_impl):
    yield


# ------------------------------------------------------------------------------------------------
# Which kernels: one abstract trace of ``fun``.

class Unsupported(NamedTuple):
  """A layer with a kernel that GHL cannot interpret (e.g. ``nn.ConvLocal``: unshared weights)."""
  type_name: str


def find_layers(fun: Callable, *args, types: tuple = tap_lib.TAPPED_TYPES, **kwargs) -> dict:
  """``{module path: Layer}`` of every layer of ``types`` that ``fun(*args, **kwargs)`` calls
  (:class:`Unsupported` for other modules that own a ``'kernel'`` param), found by tracing it
  abstractly (no compute). Array arguments may be abstract (``jax.ShapeDtypeStruct``); every
  other argument is passed as it is."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for leaf in leaves]
  found = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if context.method_name == '__call__':
      if isinstance(module, types):
        found[tuple(module.path)] = tap_lib.Layer.of(module)
      elif module.has_variable('params', 'kernel'):
        found.setdefault(tuple(module.path), Unsupported(type(module).__name__))
    return out

  def run(*arrays):
    given = iter(arrays)
    call_args, call_kwargs = jax.tree.unflatten(
        treedef, [next(given) if array else leaf for leaf, array in zip(leaves, is_array)])
    return fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(run, *[leaf for leaf, array in zip(leaves, is_array) if array])
  return found


def _kernel_location(params, module_path: tuple) -> Optional[str]:
  """The '/'-joined path of the module's kernel in ``params`` (the 'params' collection itself,
  or a variables dict holding it), or ``None``."""
  flat = _flat(params)
  for prefix in ((), ('params',)):
    path = '/'.join(prefix + module_path + ('kernel',))
    if path in flat:
      return path
  return None


def selected_kernels(rule: Rule, layers: dict, params) -> dict:
  """``{kernel path in params: (rule path, stacked axes)}`` of the layers ``rule`` selects.

  A kernel GHL cannot interpret is an error when ``rule.layers`` names it, and is logged once
  as skipped by the default selection."""
  flat = _flat(params)
  chosen, skipped = {}, []
  for module_path, layer in layers.items():
    rule_path = '/'.join(module_path + ('kernel',))
    where = _kernel_location(params, module_path)
    if where is None:
      continue
    if isinstance(layer, Unsupported):
      if rule.layers is not None and rule.selects(rule_path, False):
        raise ValueError(f'Rule layers={rule.layers!r} selects {rule_path}, the kernel of an '
                         f'nn.{layer.type_name}, which GHL cannot interpret; leave it out of layers=.')
      skipped.append(f'{rule_path} ({layer.type_name})')
      continue
    if rule.selects(rule_path, layer.is_conv):
      chosen[where] = (rule_path, flat[where].ndim - layer.kernel_ndim)
  if rule.layers is not None and not chosen:
    known = ['/'.join(p + ('kernel',)) for p, layer in layers.items() if not isinstance(layer, Unsupported)]
    raise ValueError(f'Rule layers={rule.layers!r} selects no tapped kernel; tapped kernels are {known}.')
  if skipped:
    _log_skipped(tuple(skipped))
  return chosen


@functools.lru_cache(maxsize=None)
def _log_skipped(skipped: tuple) -> None:
  logging.getLogger('ghl_jax').warning('GHL skips kernels it cannot interpret (they train by '
                                       'backprop): %s', ', '.join(skipped))


# ------------------------------------------------------------------------------------------------
# The public function.

def value_and_grad(fun: Callable, rule: Optional[Rule] = None, *, has_aux: bool = False,
                   argnums: Union[int, Sequence[int]] = 0, conv_impl: str = 'auto') -> Callable:
  """Like ``jax.value_and_grad(fun, argnums, has_aux)``, also returning the raw Hebbian terms.

  ``grad_fn(*args) -> (value, grads, hebb)``: ``value`` is ``fun``'s output (``(loss, aux)``
  with ``has_aux``), ``grads`` its gradients with respect to ``args[argnums]``, and ``hebb``
  ``{kernel path: Hebbian}`` for every kernel ``rule`` selects in the (first) differentiated
  argument: a params tree, or a variables dict holding ``'params'``. ``fun`` calls plain
  ``model.apply``. With ``rule=None``, ``hebb`` is ``{}`` (backprop on the same fast kernels).

  ``conv_impl`` picks the kernels (:func:`ghl_jax.accel.resolve`: 'auto', 'gemm' or 'xla').
  Works under ``jax.jit`` (with a sharded ``Mesh``), ``shard_map``/``pmap`` (then give
  ``ghl(axis_name=...)`` to sum the terms over devices) and ``nn.scan``.
  """
  if rule is not None and not isinstance(rule, Rule):
    raise TypeError(f'value_and_grad takes a ghl_jax.Rule (or None), got {rule!r}.')
  accel.resolve(conv_impl)
  first = argnums if isinstance(argnums, int) else argnums[0]
  grad = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)

  @functools.wraps(fun)
  def grad_fn(*args, **kwargs):
    if rule is None:
      with accel.use(conv_impl):
        value, grads = grad(*args, **kwargs)
      return value, grads, {}
    chosen = selected_kernels(rule, find_layers(fun, *args, **kwargs), args[first])
    stacked = {path: axes for path, (_, axes) in chosen.items()}
    probed = list(args)
    probed[first] = add_probes(args[first], list(chosen), forward=[p for p, s in stacked.items() if s])
    with use(rule, conv_impl):
      value, grads = grad(*probed, **kwargs)
    if isinstance(argnums, int):
      grads, terms = pop_probes(grads)
    else:
      own, terms = pop_probes(grads[0])
      grads = (own,) + tuple(grads[1:])
    return value, grads, {path: Hebbian(terms[path], stacked[path]) for path in chosen}

  return grad_fn
