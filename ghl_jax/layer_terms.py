"""Hebbian terms formed inside the layers: each governed call hands its raw term to its probe.

A governed layer call ``u = layer(x; W)`` returns ``u`` unchanged, and the zero *probe* beside its
kernel (:mod:`ghl_jax.probes`) gets as cotangent ``H = rule(x, u, W)``: for an ``nn.Conv`` on the
CPU kernels ``Σ y ⊗ x`` is ``Pᵀ y`` over the patches the backward pass builds for ``∂W = Pᵀ δ``
anyway; everywhere else the rule runs on the layer's own input and output, its products the vjp of
the layer. Kernels stacked by ``nn.scan`` form the term in the forward pass (a scan keeps only ``H``
per block, not ``u``).

Every call counts, whether or not its output reaches the loss: each call also returns a zero
*anchor* scalar, which the differentiated function adds to its value (:class:`Anchors`), so the
backward pass forms the term of a call whose output is dropped (a head applied twice, one of whose
outputs is only logged). Inside a nested transform (``nn.scan``, ``nn.remat``, ``jax.jit`` within the
loss) the anchor cannot leave the body, and such a call counts where its output reaches the loss.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

from ghl_jax import accel
from ghl_jax import adapters
from ghl_jax import trees

_ANCHORS: contextvars.ContextVar = contextvars.ContextVar('ghl_anchors', default=None)


def _trace():
  return jax.extend.core.get_opaque_trace_state(convention='flax')


class Anchors:
  """The zero anchors of the governed calls traced at the level where it was made."""

  def __init__(self):
    self._trace, self.scalars = _trace(), []

  def add(self, anchor: jax.Array) -> None:
    if _trace() == self._trace:
      self.scalars.append(anchor)

  def attach(self, value):
    """``value`` (a loss) plus every anchor: numerically the same value."""
    if not self.scalars:
      return value
    return value + sum(self.scalars).astype(jnp.result_type(value))


def anchored(fun: Callable, has_aux: bool) -> Callable:
  """``fun`` whose value (the loss; the first output with ``has_aux``) carries the anchors of the
  governed calls it makes."""
  @functools.wraps(fun)
  def run(*args, **kwargs):
    anchors = Anchors()
    token = _ANCHORS.set(anchors)
    try:
      out = fun(*args, **kwargs)
    finally:
      _ANCHORS.reset(token)
    if has_aux:
      return (anchors.attach(out[0]),) + tuple(out[1:])
    return anchors.attach(out)
  return run


def _add_anchor(anchor) -> None:
  anchors = _ANCHORS.get()
  if anchors is not None:
    anchors.add(anchor)


# ------------------------------------------------------------------------------------------------
# The term of one call.

class _PatchLayer:
  """A :class:`ghl_jax.adapters.Layer` whose ``kernel_product`` of the layer's own input is ``Pᵀ y``
  over the convolution's patches; of any other array, the layer's exact vjp."""

  def __init__(self, layer: adapters.Layer, own_inputs: tuple, product: Callable):
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
def _with_term(u, probe, context, term, forward):
  del probe, context, term, forward
  return u, jnp.zeros((), jnp.float32)


def _with_term_fwd(u, probe, context, term, forward):
  del probe
  out = u, jnp.zeros((), jnp.float32)
  if forward:
    return out, (_no_grad_term(term(context, u)), _zeros(context))
  return out, (u, context)


def _with_term_bwd(term, forward, residuals, cotangents):
  cotangent, _ = cotangents
  if forward:
    h, zeros = residuals
  else:
    u, context = residuals
    h, zeros = _no_grad_term(term(context, u)), _zeros(context)
  return cotangent, h, zeros


_with_term.defvjp(_with_term_fwd, _with_term_bwd)


def with_term(u, probe, context, term, forward: bool):
  """``u`` unchanged; ``probe``'s cotangent is ``term(context, u)`` (no cotangent to ``context``),
  formed even if ``u`` misses the loss (its anchor joins the current :func:`anchored` function)."""
  u, anchor = _with_term(u, probe, context, term, forward)
  _add_anchor(anchor)
  return u


def layer_term(rule_term, layer):
  """``(context, u) -> rule(x, u, W, layer)`` on the module's own input and output (general
  linear layers as the dense layer they are, :meth:`ghl_jax.adapters.Layer.term`)."""
  return lambda context, u: layer.term(rule_term, context['inputs'], u, context['kernel'])


def _patch_term(rule_term, layer):
  """The term over the conv's patches: ``rule(x, u + b, W, patch layer)`` on the module's input,
  kernel and output (the conv's operands when the module passed its own)."""
  def term(context, x, kernel, u, product):
    outputs = u if context['bias'] is None else u + context['bias'].astype(u.dtype)
    inputs = x if context['inputs'] is None else context['inputs']
    weights = kernel if context['kernel'] is None else context['kernel']
    inputs32 = inputs.astype(jnp.float32)
    return rule_term(inputs32, outputs, weights, _PatchLayer(layer, (inputs, inputs32), product))
  return term


def conv_with_patch_term(probe, forward: bool, inputs, kernel, bias, rule_term, layer) -> tuple:
  """``(conv, attached)``: a ``conv_general_dilated`` for one conv layer's call that runs on the
  GEMM kernels with ``rule_term`` over the same patches as ``probe``'s cotangent, and a list that is
  non-empty once it did; outside the kernels (e.g. input dilation) XLA's convolution, no term."""
  context = {'inputs': inputs, 'bias': bias, 'kernel': kernel}
  term = _patch_term(rule_term, layer)
  attached = []

  def conv_or_xla(lhs, rhs, *conv_args, out_sharding=None, **conv_kwargs):
    out = None
    if out_sharding is None:
      # The conv's own operands when they are the module's: no second copy kept for the backward.
      own = dict(context, inputs=None if inputs is lhs else inputs, kernel=None if kernel is rhs else kernel)
      out = accel.conv_with_term(lhs, rhs, *conv_args, probe=probe, context=own, term=term, forward=forward,
                                 **conv_kwargs)
    if out is None:
      sharding = {} if out_sharding is None else {'out_sharding': out_sharding}
      return lax.conv_general_dilated(lhs, rhs, *conv_args, **conv_kwargs, **sharding)
    u, anchor = out
    _add_anchor(anchor)
    attached.append(True)
    return u
  return conv_or_xla, attached


def call_with_term(module, call: Callable, inputs, probe, forward: bool, rule_term, gemm: bool,
                   kernel, bias, layer) -> jax.Array:
  """``call()`` (the module's own call on ``inputs``) with ``rule_term``'s term as ``probe``'s
  cotangent: over the conv's patches on the GEMM kernels, else by the layer's vjp."""
  if gemm and adapters.conv_kind(module) is not None:
    conv, attached = conv_with_patch_term(probe, forward, inputs, kernel, bias, rule_term, layer)
    with accel.conv_hook(module, conv):
      u = call()
    if attached:
      return u
  else:
    u = call()
  return with_term(u, probe, {'inputs': inputs, 'kernel': kernel}, layer_term(rule_term, layer), forward)


# ------------------------------------------------------------------------------------------------
# linen: an interceptor over the probed layers.

def _interceptor(term_of: Callable, probe_names: tuple, gemm: bool):
  """Governed layers (those whose params hold a probe) return their term as the probe's gradient."""
  plain, forward_name = probe_names

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not adapters.is_linen_layer(module):
      return next_fun(*args, **kwargs)
    forward = module.get_variable('params', forward_name) is not None
    probe = module.get_variable('params', forward_name if forward else plain)
    if probe is None:
      return next_fun(*args, **kwargs)
    inputs = args[0] if args else kwargs['inputs']
    kernel = trees.unbox(module.get_variable('params', 'kernel'))
    bias = trees.unbox(module.get_variable('params', 'bias')) if getattr(module, 'use_bias', False) else None
    layer = adapters.read(module, args, kwargs)
    return call_with_term(module, lambda: next_fun(*args, **kwargs), inputs, probe, forward,
                          term_of('/'.join(module.path)), gemm, kernel, bias, layer)
  return intercept


@contextlib.contextmanager
def use(term_of: Callable, probe_names: tuple, conv_impl: str = 'auto'):
  """Inside: every linen layer whose params hold a probe returns its raw term (``term_of(module
  path)``: the bound rule) as the probe's gradient; every other layer runs on the kernels of
  ``conv_impl``."""
  gemm = accel.resolve(conv_impl) == 'gemm'
  # The term interceptor sees each call before the seam's (outer interceptors run first).
  with nn.intercept_methods(_interceptor(term_of, probe_names, gemm)), accel.use(conv_impl):
    yield
