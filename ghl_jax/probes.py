"""Probes: zero arrays beside governed kernels whose gradients are the Hebbian terms.

``add_probes(params, paths)`` puts a zero float32 array shaped like each kernel beside it (named
``'hebbian_probe'``, or ``'hebbian_probe_forward'`` for kernels whose term is formed in the forward
pass); differentiating with respect to the probed tree gives each probe's cotangent, which the
governed layer sets to its term (:mod:`ghl_jax.layer_terms`); ``pop_probes`` takes them out again.
Kernels boxed by flax metadata (``nn.Partitioned``) keep their box; probes are plain arrays.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from ghl_jax import trees

PROBE = 'hebbian_probe'                    # H formed in the backward pass
PROBE_FORWARD = 'hebbian_probe_forward'    # H formed in the forward pass (stacked kernels)
PROBES = (PROBE, PROBE_FORWARD)


def add_probes(params, kernel_paths: Sequence[str], forward: Sequence[str] = ()):
  """``params`` with a zero float32 probe beside each kernel in ``kernel_paths`` (named
  ``'hebbian_probe_forward'`` for the paths also in ``forward``, else ``'hebbian_probe'``)."""
  flat = trees.flat(params, keep_empty_nodes=True)
  for path in kernel_paths:
    name = PROBE_FORWARD if path in forward else PROBE
    # zeros_like keeps the kernel's per-device type inside shard_map (a per-device term).
    flat[path[:-len('kernel')] + name] = jnp.zeros_like(trees.unbox(flat[path]), dtype=jnp.float32)
  return trees.unflat_like(params, flat)


def pop_probes(grads) -> tuple[Any, dict]:
  """``(grads without probes, {kernel_path: probe gradient})``."""
  flat = trees.flat(grads, keep_empty_nodes=True)
  terms = {}
  for path in list(flat):
    module, _, name = path.rpartition('/')
    if name in PROBES:
      terms[(module + '/' if module else '') + 'kernel'] = trees.unbox(flat.pop(path))
  return trees.unflat_like(grads, flat), terms
