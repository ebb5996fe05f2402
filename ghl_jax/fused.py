"""``value_and_grad(fun, rule)``: gradients and GHL's raw Hebbian terms from one backward pass.

::

    grad_fn = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True)    # loss_fn calls model.apply
    (loss, aux), grads, hebb = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, hebb=hebb)
    print(grad_fn.selection(params, batch).table())                 # what GHL governs

``hebb`` maps every kernel the rule governs (:mod:`ghl_jax.selection`, by its '/'-joined path in
the differentiated argument) to a :class:`ghl_jax.Hebbian`: the raw term ``H = rule(x, u, W)`` of
that layer on this call's data, float32, summed over all the layer's calls, not normalised (raw
terms add up over micro-batches and devices; ``ghl()`` normalises).

How: a zero probe beside each governed kernel (:mod:`ghl_jax.probes`) whose gradient the layer sets
to its term (:mod:`ghl_jax.layer_terms`); on the CPU kernels a conv's ``Σ y ⊗ x`` rides beside ∂W
over the same patches.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import jax

from ghl_jax import accel
from ghl_jax import layer_terms
from ghl_jax import probes
from ghl_jax import selection as selection_lib
from ghl_jax.rule import Rule
from ghl_jax.transform import Hebbian

# The pieces, for code that builds its own fused step.
add_probes, pop_probes, PROBE, PROBE_FORWARD = probes.add_probes, probes.pop_probes, probes.PROBE, probes.PROBE_FORWARD
with_term, layer_term, conv_with_patch_term = layer_terms.with_term, layer_terms.layer_term, layer_terms.conv_with_patch_term


def use(selection: Union[selection_lib.Selection, Rule], conv_impl: str = 'auto'):
  """Inside: every linen layer whose params hold a probe returns its raw term as the probe's
  gradient (the term ``selection`` binds for it; or, given a bare Rule, the rule's at that path);
  every other layer runs on the kernels of ``conv_impl``."""
  if isinstance(selection, Rule):
    term_of = lambda module: selection.term(f'{module}/kernel' if module else 'kernel')
  else:
    terms = {module: g.term for module, g in selection.by_module().items()}

    def term_of(module):
      if module not in terms:
        raise ValueError(f'{module}: a probe beside a kernel the selection does not govern '
                         f'(governed: {sorted(terms)}).')
      return terms[module]
  return layer_terms.use(term_of, probes.PROBES, conv_impl)


def value_and_grad(fun: Callable, rule: Optional[Rule] = None, *, has_aux: bool = False,
                   argnums: Union[int, Sequence[int]] = 0, conv_impl: str = 'auto') -> Callable:
  """Like ``jax.value_and_grad(fun, argnums, has_aux)``, also returning the raw Hebbian terms.

  ``grad_fn(*args) -> (value, grads, hebb)``: ``value`` is ``fun``'s output (``(loss, aux)``
  with ``has_aux``), ``grads`` its gradients with respect to ``args[argnums]``, and ``hebb``
  ``{kernel path: Hebbian}`` for every kernel ``rule`` governs in the (first) differentiated
  argument: a params tree, or a variables dict holding ``'params'``. ``fun`` calls plain
  ``model.apply``. With ``rule=None``, ``hebb`` is ``{}`` (backprop on the same fast kernels).
  ``grad_fn.selection(*args)`` is the :class:`ghl_jax.selection.Selection` it uses (a rule that
  governs nothing, or a differentiated argument without the model's kernels, is an error).

  ``conv_impl`` picks the kernels (:func:`ghl_jax.accel.resolve`: 'auto', 'gemm' or 'xla'),
  resolved once here. Works under ``jax.jit`` (with a sharded ``Mesh``), ``shard_map``/``pmap``
  (then give ``ghl(axis_name=...)`` to sum the terms over devices), ``nn.scan`` and ``nn.remat``.
  """
  if rule is not None and not isinstance(rule, Rule):
    raise TypeError(f'value_and_grad takes a ghl_jax.Rule (or None), got {rule!r}.')
  impl = accel.resolve(conv_impl)
  first = argnums if isinstance(argnums, int) else argnums[0]
  grad = jax.value_and_grad(layer_terms.anchored(fun, has_aux), argnums=argnums, has_aux=has_aux)

  def selection(*args, **kwargs) -> selection_lib.Selection:
    return selection_lib.of_linen(rule, fun, args, kwargs, args[first], f'argnums={argnums!r}')

  @functools.wraps(fun)
  def grad_fn(*args, **kwargs):
    if rule is None:
      with accel.use(impl):
        value, grads = grad(*args, **kwargs)
      return value, grads, {}
    chosen = selection(*args, **kwargs)
    probed = list(args)
    probed[first] = probes.add_probes(args[first], chosen.paths,
                                      forward=[g.path for g in chosen.governed if g.stacked])
    with use(chosen, impl):
      value, grads = grad(*probed, **kwargs)
    if isinstance(argnums, int):
      grads, terms = probes.pop_probes(grads)
    else:
      own, terms = probes.pop_probes(grads[0])
      grads = (own,) + tuple(grads[1:])
    return value, grads, {g.path: Hebbian(terms[g.path], g.stacked, rule) for g in chosen.governed}

  grad_fn.selection = selection
  return grad_fn
