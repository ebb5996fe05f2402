"""Local plasticity rules: raw Hebbian terms of one layer from its tapped activity.

Every rule is a pure function ``rule(x, u, kernel, layer, **hyper) -> H`` where ``x`` is the
layer's input, ``u`` its pre-activation output (channels last), ``kernel`` its weights and
``layer`` the static :class:`ghl_jax.tap.Layer` geometry (Dense, or N-d Conv with any strides,
padding, dilation and feature groups). ``H`` has the kernel's shape and is accumulated in
float32 whatever the compute dtype.

Sums run over *sites* (sample × output position). The pre-synaptic term ``Σ y ⊗ x`` is
``layer.kernel_product(x, y)``: the vjp of the layer with respect to its kernel with ``y`` as
cotangent, so no patch matrix (im2col) is ever built. Per-neuron quantities broadcast over the
kernel's last (output-feature) axis.

Rules return *raw* sums. ``max_normalize`` is the per-layer normalisation
``Ĥ = H / (max|H| + 1e-30)`` that ``ghl()`` applies after summing over devices and
micro-batches, so that sharded and accumulated runs give the global-batch result.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ghl_jax.tap import Layer

EPS = 1e-30


def _sites(a: jax.Array) -> jax.Array:
  """Sums over every axis but the last (channels): one value per output neuron."""
  return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


def _f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


def max_normalize(h: jax.Array, eps: float = EPS) -> jax.Array:
  """Per-layer max normalisation ``Ĥ = H / (max|H| + eps)``, so that ``max|Ĥ| = 1``."""
  return h / (jnp.max(jnp.abs(h)) + eps)


def oja_term(x, u, y, kernel, layer: Layer, decay: bool = True) -> jax.Array:
  """Oja's rule with post-synaptic activity ``y``: ``H_k = Σ y_k x − (Σ y_k u_k) W_k``."""
  x, u, y, kernel = _f32(x, u, y, kernel)
  h = layer.kernel_product(x, y, kernel.shape)
  if decay:
    h = h - _sites(y * u) * kernel
  return h


def softmax_oja(x, u, kernel, layer: Layer, *, t_inv: float = 1.0,
                competition: bool = True, decay: bool = True) -> jax.Array:
  """GHL's local term: Oja's rule with soft winner-take-all competition.

  ``y = softmax_k(t_inv · u)`` over output channels at each site, then
  ``H_k = Σ_sites y_k x − (Σ_sites y_k u_k) W_k``. ``competition=False`` uses ``y = u``
  (plain Oja); ``decay=False`` drops the Oja decay (ablations).
  """
  u32 = u.astype(jnp.float32)
  y = jax.nn.softmax(t_inv * u32, axis=-1) if competition else u32
  return oja_term(x, u32, y, kernel, layer, decay)


def softhebb(x, u, kernel, layer: Layer, *, t_inv: float = 1.0) -> jax.Array:
  """SoftHebb (Journé et al. 2023) with anti-Hebbian losers.

  ``s = softmax_k(t_inv · u)``; ``y_k = s_k`` for the winner ``k = argmax u`` and ``−s_k``
  for every loser; ``H_k = Σ y_k x − (Σ y_k u_k) W_k``.
  """
  u32 = u.astype(jnp.float32)
  s = jax.nn.softmax(t_inv * u32, axis=-1)
  winner = jax.nn.one_hot(jnp.argmax(u32, axis=-1), u32.shape[-1], dtype=bool)
  return oja_term(x, u32, jnp.where(winner, s, -s), kernel, layer)


def oja(x, u, kernel, layer: Layer) -> jax.Array:
  """Oja's rule per neuron (no competition): ``H_k = Σ u_k x − (Σ u_k²) W_k``."""
  return oja_term(x, u, u, kernel, layer)


def hebb(x, u, kernel, layer: Layer) -> jax.Array:
  """Plain Hebbian correlation: ``H = Σ_sites u ⊗ x``."""
  x, u, kernel = _f32(x, u, kernel)
  return layer.kernel_product(x, u, kernel.shape)


def _patch_norms(x, kernel, layer: Layer) -> jax.Array:
  """``‖x_patch‖`` at every site and output channel, as a convolution of ``x²`` with ones."""
  return jnp.sqrt(jnp.maximum(layer.apply(jnp.ones_like(kernel), x * x), 0.0))


def swta(x, u, kernel, layer: Layer, *, t_inv: float = 50.0,
         similarity: str = 'cosine') -> jax.Array:
  """Soft winner-take-all instar rule (Lagani et al., FastHebb form).

  ``r_k = softmax_k(t_inv · s_k)`` with similarity ``s`` (cosine of patch and ``W_k``, or the
  dot product ``u``); weights averaged over sites ``c_k = r_k / Σ_sites r_k``; then
  ``H_k = Σ_sites c_k x − (Σ_sites c_k) W_k``, i.e. each neuron moves to the
  ``r``-weighted mean of its inputs.
  """
  x, u, kernel = _f32(x, u, kernel)
  if similarity == 'cosine':
    w_norm = jnp.sqrt(_sites(kernel * kernel))
    s = u / (_patch_norms(x, kernel, layer) * w_norm + 1e-12)
  elif similarity == 'dot':
    s = u
  else:
    raise ValueError(f"swta similarity must be 'cosine' or 'dot', got {similarity!r}.")
  r = jax.nn.softmax(t_inv * s, axis=-1)
  c = r / (_sites(r) + 1e-12)
  return layer.kernel_product(x, c, kernel.shape) - _sites(c) * kernel


def hpca(x, u, kernel, layer: Layer) -> jax.Array:
  """Nonlinear Hebbian PCA, Sanger-type (Lagani et al. 2021), FastHebb form.

  ``y = ReLU(u)``; ``H = (Σ y ⊗ x − tril(YᵀY) W) / N`` over ``N`` sites, i.e.
  ``H_i = mean_n y_i (x − Σ_{j≤i} y_j W_j)``; with feature groups the sum over ``j`` stays
  inside the group of ``i``.
  """
  x, u, kernel = _f32(x, u, kernel)
  y = jax.nn.relu(u)
  features = y.shape[-1]
  n = y.size // features
  flat = y.reshape(n, features)
  groups = dict(layer.fields).get('feature_group_count', 1)
  group = jnp.arange(features) // (features // groups)
  lower = jnp.tril(jnp.ones((features, features), bool)) & (group[:, None] == group[None, :])
  yty = jnp.where(lower, flat.T @ flat, 0.0)
  decay = (kernel.reshape(-1, features) @ yty.T).reshape(kernel.shape)
  return (layer.kernel_product(x, y, kernel.shape) - decay) / n


RULES: dict[str, Callable] = {
    'softmax_oja': softmax_oja,
    'softhebb': softhebb,
    'swta': swta,
    'hpca': hpca,
    'oja': oja,
    'hebb': hebb,
}


def get(rule) -> Callable:
  """A rule by name (or a callable passed through)."""
  if callable(rule):
    return rule
  if rule not in RULES:
    raise ValueError(f'Unknown Hebbian rule {rule!r}; choose one of {sorted(RULES)}.')
  return RULES[rule]
