"""Gradient alignment of GHL: how far each governed layer's update strays from backprop's gradient.

For a governed kernel with gradient ``G``, raw term ``H``, ``Ĥ = H / max|H|`` and the optimizer's
update ``Δ`` (lr, decay and all)::

    cos_update     cos(−Δ, G)                 the applied step against steepest descent (1: along it)
    cos_magnitude  cos(|Ĥ|, |G|)              does the Hebbian size put weight where G is large?
                                               (= cos(sign(G)⊙|Ĥ|, G), the GHL direction before decay)
    near_zero      mean(|Ĥ| < 1e-3)           share of weights GHL barely moves
    top_overlap    |top-q |G| ∩ top-q |Ĥ|| / |top-q |G||, q = 10 %: the weights backprop would move
                                               most that GHL moves most too (0.1 when unrelated)
    sign_agreement mean(sign(−H) = sign(G))   the Hebbian direction against descent (0.5: unrelated)

``alignment(hebb, grads, updates)`` works on what :func:`ghl_jax.value_and_grad` and an optax
update return, in any loop; the trainer logs it as ``align/<layer>/<name>`` at log steps.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from ghl_jax import trees

NEAR_ZERO = 1e-3
TOP_FRACTION = 0.1
_EPS = 1e-30


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """``Σ ab / (‖a‖ ‖b‖)`` over every entry, in float32 (0 where either is all zeros)."""
  a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
  return jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + _EPS)


def top_overlap(g: jax.Array, h: jax.Array, fraction: float = TOP_FRACTION) -> jax.Array:
  """Share of the ``fraction`` largest ``|g|`` entries that are also among the largest ``|h|``."""
  g, h = jnp.abs(g.astype(jnp.float32)).ravel(), jnp.abs(h.astype(jnp.float32)).ravel()
  k = max(1, int(round(fraction * g.size)))
  top_g = jnp.zeros(g.shape, bool).at[jax.lax.top_k(g, k)[1]].set(True)
  top_h = jnp.zeros(h.shape, bool).at[jax.lax.top_k(h, k)[1]].set(True)
  return jnp.sum(top_g & top_h) / k


def layer_alignment(grad: jax.Array, term, update: Optional[jax.Array] = None) -> dict:
  """The measures of the module docstring for one kernel (``term`` a :class:`ghl_jax.Hebbian`)."""
  h_hat = term.normalized()
  grad = grad.astype(jnp.float32)
  out = {'cos_magnitude': cosine(jnp.abs(h_hat), jnp.abs(grad)),
         'near_zero': jnp.mean(jnp.abs(h_hat) < NEAR_ZERO),
         'top_overlap': top_overlap(grad, h_hat),
         'sign_agreement': jnp.mean(jnp.sign(-term.term) == jnp.sign(grad))}
  if update is not None:
    out['cos_update'] = cosine(-update, grad)
  return out


def alignment(hebb: Mapping[str, Any], grads: Any, updates: Any = None) -> dict:
  """``{module path: {measure: scalar}}`` for every kernel in ``hebb`` (see the module docstring);
  ``updates`` (the optimizer's, same tree as ``grads``) adds ``cos_update``."""
  flat_grads = trees.flat(grads)
  flat_updates = trees.flat(updates) if updates is not None else {}
  out = {}
  for path, term in hebb.items():
    update = flat_updates.get(path)
    out[path.rsplit('/', 1)[0]] = layer_alignment(trees.unbox(flat_grads[path]), term,
                                                  None if update is None else trees.unbox(update))
  return out
