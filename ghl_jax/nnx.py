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

from flax import nnx
import jax
import jax.numpy as jnp

from ghl_jax import accel, adapters, layer_terms
from ghl_jax import selection as selection_lib
from ghl_jax.rule import Rule
from ghl_jax.transform import Hebbian

LAYER_TYPES = adapters.NNX_TYPES


def layer_of(module, einsum_str: Optional[str] = None):
  """The linen geometry (:class:`ghl_jax.adapters.Layer`) of an NNX layer (or of one call)."""
  layer = adapters.read(module, (), {'einsum_str': einsum_str} if einsum_str else {})
  if not isinstance(layer, adapters.Layer):
    raise ValueError(f'ghl_jax.nnx cannot read a {type(module).__name__}; layers are {LAYER_TYPES}.')
  return layer


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


def selected_layers(model, rule_or_selection) -> dict:
  """``{kernel path: layer module}`` of the NNX layers a Rule (or its :class:`Selection`) governs."""
  selection = (rule_or_selection if isinstance(rule_or_selection, selection_lib.Selection)
               else selection_lib.of_nnx(rule_or_selection, model))
  modules = {m: module for m, (_, module) in selection_lib.nnx_layers(model).items()}
  return {g.path: modules[g.rule_path.rsplit('/', 1)[0]] for g in selection.governed}


def _layer_call(gemm: bool) -> Callable:
  """The hook of :func:`value_and_grad`: convolutions on the kernels ``gemm`` picks, and each layer
  that carries a probe for this call gives it its term (over the conv's own patches on the GEMM
  kernels, else by the layer's vjp), read with the call's own settings (an ``nnx.Einsum``'s
  call-time equation)."""
  def run(module, call, inputs, *args, **kwargs):
    probe = getattr(module, '_ghl_probe', None)
    own_call = lambda: call(module, inputs, *args, **kwargs)
    if probe is None:
      if not (gemm and adapters.conv_kind(module) == 'nnx'):
        return own_call()
      with accel.conv_hook(module, accel.gemm_conv):
        return own_call()
    layer = adapters.read(module, (inputs,) + args, kwargs)
    bias = module.bias[...] if getattr(module, 'bias', None) is not None else None
    return layer_terms.call_with_term(module, own_call, inputs, probe[...], False,
                                      module._ghl_term, gemm, module.kernel[...], bias, layer)  # pylint: disable=protected-access
  return run


@contextlib.contextmanager
def _probes(chosen: dict, selection: selection_lib.Selection):
  """Inside: each chosen layer carries a zero :class:`HebbianProbe` and its bound rule."""
  try:
    for path, module in chosen.items():
      module._ghl_probe = HebbianProbe(jnp.zeros(module.kernel[...].shape, jnp.float32))
      module._ghl_term = selection[path].term
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
  an ``nnx.State`` of the params, ``hebb`` ``{kernel path: Hebbian}`` for the layers ``rule`` governs
  (``grad_fn.selection(model)``, :func:`ghl_jax.selection.of_nnx`), each summed over all its calls.
  Works under ``nnx.jit`` and ``jax.jit``, with layers stacked by ``nnx.scan`` / ``nnx.vmap``; hand
  ``hebb`` to ``optimizer.update(model, grads, hebb=hebb)``. ``conv_impl`` picks the kernels of the
  ``nnx.Conv`` layers (:func:`ghl_jax.accel.resolve`; on CPU the GEMM backward, as for linen)."""
  if rule is not None and not isinstance(rule, Rule):
    raise TypeError(f'ghl_jax.nnx.value_and_grad takes a ghl_jax.Rule (or None), got {rule!r}.')
  gemm = accel.resolve(conv_impl) == 'gemm'
  anchored = layer_terms.anchored(fun, has_aux)

  def grad_fn(model, *args, **kwargs):
    if rule is None:
      with _hooked(_layer_call(gemm)):
        value, grads = nnx.value_and_grad(fun, has_aux=has_aux)(model, *args, **kwargs)
      return value, grads, {}
    selection = selection_lib.of_nnx(rule, model)
    chosen = selected_layers(model, selection)
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, HebbianProbe))
    with _probes(chosen, selection), _hooked(_layer_call(gemm)):
      value, both = nnx.value_and_grad(anchored, argnums=wrt, has_aux=has_aux)(model, *args, **kwargs)
    grads, probes = nnx.split_state(both, nnx.Param, HebbianProbe)
    terms = {'/'.join(str(p) for p in parts[:-1] + ('kernel',)): leaf for parts, leaf in nnx.to_flat_state(probes)}
    return value, grads, {g.path: Hebbian(jax.lax.stop_gradient(terms[g.path][...]), g.stacked, rule)
                          for g in selection.governed}

  grad_fn.selection = lambda model: selection_lib.of_nnx(rule, model)
  return grad_fn


def tap(fun: Callable) -> Callable:
  """``tap(fun)(model, *args) -> (fun's output, taps)``: the input and output of every NNX layer
  call, as :func:`ghl_jax.tap` gives them for linen (``taps[...]['inputs'|'outputs'|'layer']``,
  nested by module path), for :func:`ghl_jax.hebbian_terms`."""
  def tapped(model, *args, **kwargs):
    taps, unrecorded = {}, []
    paths = {id(module): tuple(path.split('/')) for path, (_, module) in selection_lib.nnx_layers(model).items()}

    def record(module, call, inputs, *call_args, **call_kwargs):
      out = call(module, inputs, *call_args, **call_kwargs)
      if id(module) not in paths:                # a copy inside nnx.scan / nnx.vmap (or a layer built
                                                 # in fun): not in the model's tree, not recorded
        unrecorded.append(type(module).__name__)
        return out
      node = taps
      for key in paths[id(module)]:
        node = node.setdefault(key, {})
      entry = {'inputs': inputs, 'outputs': out, 'layer': adapters.read(module, (inputs,) + call_args, call_kwargs)}
      if 'inputs' in node:                       # a layer called again: one entry per call
        entry = {k: (node[k] if isinstance(node[k], tuple) else (node[k],)) + (v,) for k, v in entry.items()}
      node.update(entry)
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
