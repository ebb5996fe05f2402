"""Matrix products in low precision at the CPU's bfloat16 peak.

XLA:CPU runs a bfloat16 GEMM at its peak only when the product is accumulated into float32
(``preferred_element_type``); with a bfloat16 result it runs below the float32 GEMM. So a
low-precision ``dot_general`` here is computed as::

    out = cast_bf16( Σ_k a_k b_k  in float32 )        forward
    ∂a  = cast_bf16( g · bᵀ in float32 ),  ∂b = cast_bf16( aᵀ · g in float32 )    backward

(each written as an einsum over the same axis letters as the forward product, so any
``dimension_numbers`` work). Other dtypes and calls that set their own accumulation type go to
``lax.dot_general`` unchanged.
"""
from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
from jax import lax


def low_precision(dtype) -> bool:
  """Floating types narrower than float32 (bfloat16, float16): their GEMMs accumulate in float32."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def dot(a, b, dimension_numbers, precision=None, accumulate=None) -> jax.Array:
  """``lax.dot_general`` whose low-precision operands accumulate in float32; the result in
  ``accumulate`` if given, else in the operands' type (no custom gradient: for callers that write
  their own backward pass)."""
  wide = accumulate or (jnp.float32 if low_precision(a.dtype) else None)
  out = lax.dot_general(a, b, dimension_numbers, precision=precision, preferred_element_type=wide)
  return out if accumulate else out.astype(a.dtype)


def _specs(a_ndim: int, b_ndim: int, dimension_numbers) -> tuple:
  """Einsum letters ``(a, b, out)`` of ``lax.dot_general(a, b, dimension_numbers)``."""
  (a_contract, b_contract), (a_batch, b_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  a = [next(letters) for _ in range(a_ndim)]
  b = [None] * b_ndim
  for i, j in zip(tuple(a_contract) + tuple(a_batch), tuple(b_contract) + tuple(b_batch)):
    b[j] = a[i]
  b = [c or next(letters) for c in b]
  a_free = [a[i] for i in range(a_ndim) if i not in a_contract and i not in a_batch]
  b_free = [b[j] for j in range(b_ndim) if j not in b_contract and j not in b_batch]
  out = [a[i] for i in a_batch] + a_free + b_free
  return ''.join(a), ''.join(b), ''.join(out)


def _einsum(spec, x, y, precision, dtype):
  return jnp.einsum(spec, x, y, precision=precision, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _wide_dot(a, b, dimension_numbers, precision):
  return dot(a, b, dimension_numbers, precision)


def _wide_dot_fwd(a, b, dimension_numbers, precision):
  return dot(a, b, dimension_numbers, precision), (a, b)


def _wide_dot_bwd(dimension_numbers, precision, residuals, g):
  a, b = residuals
  sa, sb, so = _specs(a.ndim, b.ndim, dimension_numbers)
  g = g.astype(a.dtype)
  return (_einsum(f'{so},{sb}->{sa}', g, b, precision, a.dtype),
          _einsum(f'{sa},{so}->{sb}', a, g, precision, b.dtype))


_wide_dot.defvjp(_wide_dot_fwd, _wide_dot_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """``lax.dot_general`` (same signature, for ``nn.Dense``'s ``dot_general`` hook); bfloat16 and
  float16 operands of one type accumulate in float32 in both passes."""
  if (preferred_element_type is not None or kwargs or lhs.dtype != rhs.dtype
      or not low_precision(lhs.dtype)):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  return _wide_dot(lhs, rhs, tuple(map(lambda p: tuple(map(tuple, p)), dimension_numbers)), precision)
