"""GHL for flax NNX models: the same :class:`~ghl_jax.Rule`, ``ghl()`` and raw Hebbian terms.

::

    rule = ghl_jax.Rule('softmax_oja', t_inv=0.65)               # every nnx.Conv kernel
    optimizer = nnx.Optimizer(model, optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(lr)), wrt=nnx.Param)
    grad_fn = ghl_jax.nnx.value_and_grad(loss_fn, rule)          # loss_fn(model, batch)
    loss, grads, hebb = grad_fn(model, batch)
    optimizer.update(model, grads, hebb=hebb)

Layers: ``nnx.Conv``, ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and
``nnx.ConvTranspose`` (so ``nnx.MultiHeadAttention``'s query/key/value/out), each read as its linen
counterpart (:class:`ghl_jax.tap.Layer`), so a rule gives the same term as on the same linen
model. The term of a selected layer comes back as the gradient of a zero probe, formed in the
backward pass by the rule on the layer's input and output: for ``nnx.Conv`` on the CPU kernels
over the convolution's own patches (as for linen), else with products by the layer's vjp. Kernel
paths are the '/'-joined paths of ``nnx.state(model, nnx.Param)``.

The probe is a variable (:class:`HebbianProbe`) set on the layer for the call, shaped like its
kernel, so ``nnx.scan`` / ``nnx.vmap`` slice it as they slice the kernel: layers stacked by them get
a stacked term (``Hebbian.stacked`` leading axes), each slice normalised on its own by ``ghl()``.
(:func:`tap` records calls outside such transforms only, and logs once how many it left out.)
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from ghl_jax import accel, fused
from ghl_jax.rule import Rule
from ghl_jax.tap import Layer
from ghl_jax.transform import Hebbian

LAYER_TYPES = (nnx.Conv, nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.ConvTranspose)


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def layer_of(module) -> Layer:
  """The linen geometry (:class:`ghl_jax.tap.Layer`) of an NNX layer."""
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    fields = {'features': module.out_features, 'kernel_size': _tuple(module.kernel_size),
              'strides': _tuple(module.strides), 'padding': _tuple(module.padding),
              'kernel_dilation': _tuple(module.kernel_dilation)}
    if isinstance(module, nnx.Conv):
      fields.update(input_dilation=_tuple(module.input_dilation),
                    feature_group_count=module.feature_group_count)
      return Layer(nn.Conv, tuple(fields.items()))
    fields['transpose_kernel'] = module.transpose_kernel
    return Layer(nn.ConvTranspose, tuple(fields.items()))
  if isinstance(module, nnx.Linear):
    return Layer(nn.Dense, (('features', module.out_features),))
  if isinstance(module, nnx.LinearGeneral):
    return Layer(nn.DenseGeneral, (('features', tuple(module.out_features)), ('axis', tuple(module.axis)),
                                   ('batch_dims', tuple(sorted(module.batch_axis)))))
  if isinstance(module, nnx.Einsum):
    return Layer(nn.Einsum, (('shape', tuple(module.kernel_shape)), ('einsum_str', module.einsum_str)))
  raise ValueError(f'ghl_jax.nnx cannot read a {type(module).__name__}; layers are {LAYER_TYPES}.')


def _path(parts) -> str:
  return '/'.join(str(p) for p in parts)


class HebbianProbe(nnx.Variable):
  """A layer's zero probe for one call: its gradient is the layer's raw Hebbian term."""


@contextlib.contextmanager
def _hooked(hook: Callable):
  """Inside: every call ``layer(x, ...)`` of an NNX layer runs as ``hook(layer, call, x, ...)``."""
  originals = {cls: cls.__dict__['__call__'] for cls in LAYER_TYPES}

  def wrap(call):
    @functools.wraps(call)
    def hooked(self, inputs, *args, **kwargs):
      return hook(self, call, inputs, *args, **kwargs)
    return hooked
  try:
    for cls, call in originals.items():
      cls.__call__ = wrap(call)
    yield
  finally:
    for cls, call in originals.items():
      cls.__call__ = call


def selected_layers(model, rule: Rule) -> dict:
  """``{kernel path: layer module}`` of the NNX layers ``rule`` selects in ``model``."""
  chosen = {}
  for parts, module in nnx.iter_modules(model):
    if not isinstance(module, LAYER_TYPES):
      continue
    path = _path(tuple(parts) + ('kernel',))
    if not rule.selects(path, isinstance(module, nnx.Conv)):
      continue
    chosen[path] = module
  if rule.layers is not None and not chosen:
    raise ValueError(f'Rule layers={rule.layers!r} selects no NNX layer; layers are '
                     f'{[_path(tuple(p) + ("kernel",)) for p, m in nnx.iter_modules(model) if isinstance(m, LAYER_TYPES)]}.')
  return chosen


def _stacked(module) -> int:
  """Leading kernel axes added by ``nnx.scan`` / ``nnx.vmap`` (0 for a plain layer)."""
  return module.kernel[...].ndim - layer_of(module).kernel_ndim


def _on_gemm(module, gemm: bool) -> bool:
  """Whether this layer's convolution goes to the CPU kernels (an ``nnx.Conv`` with lax's own)."""
  return gemm and isinstance(module, nnx.Conv) and module.conv_general_dilated is jax.lax.conv_general_dilated


def _layer_call(gemm: bool) -> Callable:
  """The hook of :func:`value_and_grad`: convolutions on the kernels ``gemm`` picks, and each layer
  that carries a probe for this call gives it its term (over the conv's own patches on the GEMM
  kernels, else by the layer's vjp)."""
  def run(module, call, inputs, *args, **kwargs):
    probe = getattr(module, '_ghl_probe', None)
    on_gemm = _on_gemm(module, gemm)
    if probe is None:
      if not on_gemm:
        return call(module, inputs, *args, **kwargs)
      with accel.conv_hook(module, accel.gemm_conv):
        return call(module, inputs, *args, **kwargs)
    layer, rule_term, kernel = layer_of(module), module._ghl_term, module.kernel[...]  # pylint: disable=protected-access
    if on_gemm:
      bias = module.bias[...] if module.bias is not None else None
      conv, attached = fused.conv_with_patch_term(probe[...], False, inputs, kernel, bias, rule_term, layer)
      with accel.conv_hook(module, conv):
        out = call(module, inputs, *args, **kwargs)
      if attached:
        return out
    else:
      out = call(module, inputs, *args, **kwargs)
    return fused.with_term(out, probe[...], {'inputs': inputs, 'kernel': kernel},
                           fused.layer_term(rule_term, layer), False)
  return run


@contextlib.contextmanager
def _probes(chosen: dict, rule: Rule):
  """Inside: each chosen layer carries a zero :class:`HebbianProbe` and its bound rule."""
  try:
    for path, module in chosen.items():
      module._ghl_probe = HebbianProbe(jnp.zeros(module.kernel[...].shape, jnp.float32))
      module._ghl_term = rule.term(path)
    yield
  finally:
    for module in chosen.values():
      for name in ('_ghl_probe', '_ghl_term'):
        if name in vars(module):
          delattr(module, name)


def value_and_grad(fun: Callable, rule: Optional[Rule] = None, *, has_aux: bool = False,
                   conv_impl: str = 'auto') -> Callable:
  """Like ``nnx.value_and_grad(fun, has_aux=...)`` with respect to the model (the first argument),
  also returning the raw Hebbian terms: ``grad_fn(model, *args) -> (value, grads, hebb)``, ``grads``
  an ``nnx.State`` of the params, ``hebb`` ``{kernel path: Hebbian}`` for the layers ``rule`` selects.
  Works under ``nnx.jit`` and ``jax.jit``, with layers stacked by ``nnx.scan`` / ``nnx.vmap``; hand
  ``hebb`` to ``optimizer.update(model, grads, hebb=hebb)``. ``conv_impl`` picks the kernels of the
  ``nnx.Conv`` layers (:func:`ghl_jax.accel.resolve`; on CPU the GEMM backward, as for linen)."""
  if rule is not None and not isinstance(rule, Rule):
    raise TypeError(f'ghl_jax.nnx.value_and_grad takes a ghl_jax.Rule (or None), got {rule!r}.')
  gemm = accel.resolve(conv_impl) == 'gemm'

  def grad_fn(model, *args, **kwargs):
    if rule is None:
      with _hooked(_layer_call(gemm)):
        value, grads = nnx.value_and_grad(fun, has_aux=has_aux)(model, *args, **kwargs)
      return value, grads, {}
    chosen = selected_layers(model, rule)
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, HebbianProbe))
    with _probes(chosen, rule), _hooked(_layer_call(gemm)):
      value, both = nnx.value_and_grad(fun, argnums=wrt, has_aux=has_aux)(model, *args, **kwargs)
    grads, probes = nnx.split_state(both, nnx.Param, HebbianProbe)
    terms = {_path(parts[:-1] + ('kernel',)): leaf for parts, leaf in nnx.to_flat_state(probes)}
    return value, grads, {path: Hebbian(jax.lax.stop_gradient(terms[path][...]), _stacked(module))
                          for path, module in chosen.items()}

  return grad_fn


def tap(fun: Callable) -> Callable:
  """``tap(fun)(model, *args) -> (fun's output, taps)``: the input and output of every NNX layer
  call, as :func:`ghl_jax.tap` gives them for linen (``taps[...]['inputs'|'outputs'|'layer']``,
  nested by module path), for :func:`ghl_jax.hebbian_terms`."""
  def tapped(model, *args, **kwargs):
    taps, unrecorded = {}, []
    paths = {id(m): tuple(str(p) for p in parts) for parts, m in nnx.iter_modules(model)
             if isinstance(m, LAYER_TYPES)}

    def record(module, call, inputs, *call_args, **call_kwargs):
      out = call(module, inputs, *call_args, **call_kwargs)
      if id(module) not in paths:                # a copy inside nnx.scan / nnx.vmap (or a layer built
                                                 # in fun): not in the model's tree, not recorded
        unrecorded.append(type(module).__name__)
        return out
      node = taps
      for key in paths[id(module)]:
        node = node.setdefault(key, {})
      node.update(inputs=inputs, outputs=out, layer=layer_of(module))
      return out
    with _hooked(record):
      out = fun(model, *args, **kwargs)
    if unrecorded:
      _log_unrecorded(len(unrecorded), ', '.join(sorted(set(unrecorded))))
    return out, taps
  return tapped


@functools.lru_cache(maxsize=None)
def _log_unrecorded(count: int, types: str) -> None:
  logging.getLogger('ghl_jax').warning(
      'ghl_jax.nnx.tap leaves out %d traced call(s) of layers outside the model\'s module tree (%s): '
      'layers inside nnx.scan / nnx.vmap, whose terms ghl_jax.nnx.value_and_grad gives, or built in fun.',
      count, types)
