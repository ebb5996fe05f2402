"""General linear layers (``nn.DenseGeneral``, ``nn.Einsum``) seen as the dense layer they are.

A kernel ``W`` contracted with an input ``x`` as ``u = einsum(x, W)`` has four kinds of axes::

    contracted  C   in x and W, not in u      the inputs of each neuron
    features    F   in W and u only           the neurons (flattened: they all compete)
    batch       B   in x, W and u             separate layers (one W slice each, like nn.scan)
    sites       S   in x and u only           where the neurons fire (samples, tokens, ...)

so ``x → (B, S, C)``, ``u → (B, S, F)``, ``W → (B, C, F)`` is a dense layer with ``|C|`` inputs and
``|F|`` outputs at ``|S|`` sites, and any rule of :mod:`ghl_jax.rules` applies to it unchanged; its
term ``(B, C, F)`` is laid back into the kernel's own axes. For attention's query/key/value kernels
``(embed, heads, head_dim)`` every head and head dimension is a neuron of one softmax competition;
the out kernel ``(heads, head_dim, embed)`` has ``heads·head_dim`` inputs per neuron. With
``per_head`` the leading feature axes ``G`` (the heads) are separate layers too: ``W → (B, G, C, F)``
with ``F`` the last output axis, every head a dense layer of its own on the same input.
"""
from __future__ import annotations

import math
import string
from typing import Callable, NamedTuple

import jax


class Spec(NamedTuple):
  """Axis letters of the input, the kernel and the output of ``u = einsum(x, W)``."""
  x: str
  kernel: str
  out: str


def dense_general_spec(x_ndim: int, features, axis, batch_dims) -> Spec:
  """The :class:`Spec` of ``nn.DenseGeneral(features, axis, batch_dims)`` on a rank-``x_ndim`` input."""
  features = features if isinstance(features, tuple) else (features,)
  axis = tuple(a % x_ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
  batch = tuple(b % x_ndim for b in (batch_dims if isinstance(batch_dims, tuple) else (batch_dims,)))
  letters = string.ascii_letters
  x = letters[:x_ndim]
  feats = letters[x_ndim:x_ndim + len(features)]
  kernel = ''.join(x[b] for b in batch) + ''.join(x[a] for a in axis) + feats
  out = (''.join(x[b] for b in batch) + ''.join(x[i] for i in range(x_ndim) if i not in axis and i not in batch)
         + feats)
  return Spec(x, kernel, out)


def einsum_spec(einsum_str: str) -> Spec:
  """The :class:`Spec` of ``nn.Einsum(shape, einsum_str)`` (explicit form ``'x,kernel->out'``)."""
  if not einsum_str or '...' in einsum_str or '->' not in einsum_str:
    raise ValueError(f'GHL reads nn.Einsum kernels from an explicit einsum_str without "...", given in '
                     f'the constructor; got {einsum_str!r}.')
  operands, out = einsum_str.replace(' ', '').split('->')
  x, kernel = operands.split(',')
  return Spec(x, kernel, out)


def _axes(spec: Spec) -> tuple[str, str, str, str]:
  """``(batch, sites, contracted, features)`` letters, each in the order they appear."""
  batch = ''.join(c for c in spec.kernel if c in spec.x and c in spec.out)
  contracted = ''.join(c for c in spec.kernel if c in spec.x and c not in spec.out)
  features = ''.join(c for c in spec.kernel if c not in spec.x)
  sites = ''.join(c for c in spec.x if c not in spec.kernel)
  if any(c not in spec.out for c in features) or any(c not in spec.out for c in sites):
    raise ValueError(f'GHL cannot read the kernel of einsum {spec.x},{spec.kernel}->{spec.out}: every '
                     'kernel-only axis must be an output axis and no input axis may be summed away.')
  return batch, sites, contracted, features


def _to(array, spec_letters: str, target: str):
  return array.transpose(tuple(spec_letters.index(c) for c in target))


def evaluate(rule: Callable, dense_layer, spec: Spec, x, u, kernel, per_head: bool = False):
  """``rule(x, u, kernel, layer)`` of the dense layer that ``spec`` describes, in the kernel's axes.

  ``dense_layer`` is the :class:`ghl_jax.tap.Layer` of an ``nn.Dense`` with ``|F|`` features;
  ``per_head``: all feature axes but the last are separate layers (see the module docstring)."""
  batch, sites, contracted, features = _axes(spec)
  groups, features = (features[:-1], features[-1:]) if per_head else ('', features)
  size = dict(zip(spec.x, x.shape))
  size.update(zip(spec.kernel, kernel.shape))
  n = lambda letters: math.prod(size[c] for c in letters)
  lead = tuple(size[c] for c in batch)
  heads = tuple(size[c] for c in groups)
  x2 = _to(x, spec.x, batch + sites + contracted).reshape(lead + (n(sites), n(contracted)))
  u2 = _to(u, spec.out, batch + groups + sites + features).reshape(lead + heads + (n(sites), n(features)))
  k2 = _to(kernel, spec.kernel, batch + groups + contracted + features).reshape(
      lead + heads + (n(contracted), n(features)))
  fn = lambda x, u, k: rule(x, u, k, dense_layer)
  for _ in groups:
    fn = jax.vmap(fn, in_axes=(None, 0, 0))
  for _ in batch:
    fn = jax.vmap(fn)
  h = fn(x2, u2, k2).reshape(lead + heads + tuple(size[c] for c in contracted + features))
  return _to(h, batch + groups + contracted + features, spec.kernel)
