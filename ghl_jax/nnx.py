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
backward pass by the rule on the layer's input and output (products by the layer's vjp). Kernel
paths are the '/'-joined paths of ``nnx.state(model, nnx.Param)``. Layers stacked by ``nnx.scan`` /
``nnx.vmap`` are not supported (an error names them).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from ghl_jax import fused
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


@contextlib.contextmanager
def _hooked(hooks: dict):
  """Inside: a call of an NNX layer in ``hooks`` (by id) returns ``hooks[id](module, x, u)``."""
  originals = {cls: cls.__dict__['__call__'] for cls in LAYER_TYPES}

  def wrap(call):
    @functools.wraps(call)
    def hooked(self, inputs, *args, **kwargs):
      out = call(self, inputs, *args, **kwargs)
      hook = hooks.get(id(self))
      return out if hook is None else hook(self, inputs, out)
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
    if module.kernel[...].ndim != layer_of(module).kernel_ndim:
      raise ValueError(f'{path}: a kernel stacked by nnx.scan/nnx.vmap ({module.kernel[...].shape}); '
                       'ghl_jax.nnx does not read stacked layers: leave it out of layers=.')
    chosen[path] = module
  if rule.layers is not None and not chosen:
    raise ValueError(f'Rule layers={rule.layers!r} selects no NNX layer; layers are '
                     f'{[_path(tuple(p) + ("kernel",)) for p, m in nnx.iter_modules(model) if isinstance(m, LAYER_TYPES)]}.')
  return chosen


def _attach(probe, rule_term: Callable, module, inputs, out):
  layer = layer_of(module)
  return fused.with_term(out, probe, {'inputs': inputs, 'kernel': module.kernel[...]},
                         fused.layer_term(rule_term, layer), False)


def value_and_grad(fun: Callable, rule: Optional[Rule] = None, *, has_aux: bool = False) -> Callable:
  """Like ``nnx.value_and_grad(fun, has_aux=...)`` with respect to the model (the first argument),
  also returning the raw Hebbian terms: ``grad_fn(model, *args) -> (value, grads, hebb)``, ``grads``
  an ``nnx.State`` of the params, ``hebb`` ``{kernel path: Hebbian}`` for the layers ``rule`` selects.
  Works under ``nnx.jit`` and ``jax.jit``; hand ``hebb`` to ``optimizer.update(model, grads, hebb=hebb)``."""
  if rule is not None and not isinstance(rule, Rule):
    raise TypeError(f'ghl_jax.nnx.value_and_grad takes a ghl_jax.Rule (or None), got {rule!r}.')

  def grad_fn(model, *args, **kwargs):
    if rule is None:
      value, grads = nnx.value_and_grad(fun, has_aux=has_aux)(model, *args, **kwargs)
      return value, grads, {}
    chosen = selected_layers(model, rule)
    probes = {path: jnp.zeros(module.kernel[...].shape, jnp.float32) for path, module in chosen.items()}

    def probed(model, probes):
      hooks = {id(module): functools.partial(_attach, probes[path], rule.term(path))
               for path, module in selected_layers(model, rule).items()}
      with _hooked(hooks):
        return fun(model, *args, **kwargs)
    value, (grads, terms) = nnx.value_and_grad(probed, argnums=(0, 1), has_aux=has_aux)(model, probes)
    return value, grads, {path: Hebbian(jax.lax.stop_gradient(terms[path])) for path in chosen}

  return grad_fn


def tap(fun: Callable) -> Callable:
  """``tap(fun)(model, *args) -> (fun's output, taps)``: the input and output of every NNX layer
  call, as :func:`ghl_jax.tap` gives them for linen (``taps[...]['inputs'|'outputs'|'layer']``,
  nested by module path), for :func:`ghl_jax.hebbian_terms`."""
  def tapped(model, *args, **kwargs):
    taps = {}
    paths = {id(m): tuple(str(p) for p in parts) for parts, m in nnx.iter_modules(model)
             if isinstance(m, LAYER_TYPES)}

    def record(module, inputs, out):
      node = taps
      for key in paths[id(module)]:
        node = node.setdefault(key, {})
      node.update(inputs=inputs, outputs=out, layer=layer_of(module))
      return out
    with _hooked({i: record for i in paths}):
      out = fun(model, *args, **kwargs)
    return out, taps
  return tapped
