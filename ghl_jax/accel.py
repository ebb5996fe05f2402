"""The one seam between the core and :mod:`ghl_jax.kernels`: which kernels run, chosen by backend.

``impl`` is ``'auto'`` (the kernels measured to be faster on this backend: ``'gemm'`` on CPU,
``'xla'`` elsewhere), ``'gemm'`` (the CPU kernels: convolutions with a two-GEMM backward pass,
max pooling with a fused backward pass, bfloat16 products accumulated in float32 in convolutions
and dense layers) or ``'xla'`` (XLA's own ops everywhere)::

    with ghl_jax.accel.use('auto'):            # every nn.Conv / models.layers.MaxPool inside
      loss, grads = jax.value_and_grad(loss_fn)(params)

Models are not touched: the swap goes through ``nn.Conv``'s ``conv_general_dilated`` and
``nn.Dense``/``nn.DenseGeneral``'s ``dot_general`` hooks and an interceptor of :class:`ghl_jax.models.layers.MaxPool` calls. :func:`ghl_jax.value_and_grad`
uses this seam; so does the trainer, which also calls :func:`prepare_host`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import flax.linen as nn
import jax

from ghl_jax import adapters
from ghl_jax import kernels
from ghl_jax.models.layers import MaxPool

IMPLS = ('auto', 'xla', 'gemm')


def resolve(impl: str) -> str:
  """``'auto'`` → ``'gemm'`` on CPU, ``'xla'`` on GPU/TPU; ``'xla'``/``'gemm'`` as given."""
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'auto':
    return 'gemm' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def has_own_conv(module) -> bool:
  """Whether an ``nn.Conv`` brings its own convolution (then it is left alone)."""
  return adapters.brings_own_conv(module)


@contextlib.contextmanager
def _hook(module, name: str, fn: Callable):
  previous = getattr(module, name)
  object.__setattr__(module, name, fn)
  try:
    yield
  finally:
    object.__setattr__(module, name, previous)


def conv_hook(module, conv: Callable):
  """Runs ``module`` (an ``nn.Conv`` or ``nnx.Conv``) with ``conv`` as its ``conv_general_dilated``."""
  return _hook(module, 'conv_general_dilated', conv)


def gemm_conv(*args, out_sharding=None, **kwargs):
  """The CPU kernels' convolution (two-GEMM backward) as ``nnx.Conv`` calls it; XLA's own where
  an ``out_sharding`` is asked for."""
  if out_sharding is not None:
    return jax.lax.conv_general_dilated(*args, out_sharding=out_sharding, **kwargs)
  return kernels.conv.conv_general_dilated(*args, **kwargs)


def conv_with_term(lhs, rhs, window_strides=None, padding='VALID', lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None, *, probe, context, term: Callable, forward: bool):
  """``(u, anchor)`` of :func:`ghl_jax.kernels.conv.conv_with_term` for a ``conv_general_dilated``
  call the GEMM kernels cover, else ``None`` (then the caller runs XLA's convolution)."""
  geometry = kernels.conv.geometry_of(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      batch_group_count, precision)
  if geometry is None or preferred_element_type is not None or lhs.dtype != rhs.dtype:
    return None
  return kernels.conv.conv_with_term(lhs, rhs, geometry, probe=probe, context=context, term=term,
                                     forward=forward)


def _swap(next_fun, args, kwargs, context):
  """An ``nn.Conv`` call with the GEMM backward; ``nn.Dense``/``nn.DenseGeneral`` with low-precision
  products accumulated in float32; a ``MaxPool`` call with the fused backward."""
  module = context.module
  if context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  if adapters.conv_kind(module) == 'linen':
    with conv_hook(module, kernels.conv.conv_general_dilated):
      return next_fun(*args, **kwargs)
  if adapters.swappable_dot(module):
    with _hook(module, 'dot_general', kernels.matmul.dot_general):
      return next_fun(*args, **kwargs)
  if isinstance(module, MaxPool):
    x = args[0] if args else kwargs['inputs']
    return kernels.pooling.max_pool(x, module.window_shape, module.strides, module.padding)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def use(impl: str = 'auto'):
  """Inside: convolutions and max pools run with the kernels ``impl`` names (see :func:`resolve`)."""
  if resolve(impl) == 'xla':
    yield
    return
  with nn.intercept_methods(_swap):
    yield


def wrap(fn: Callable, impl: str = 'auto') -> Callable:
  """``fn`` (e.g. ``model.apply``) running under :func:`use` ``(impl)``."""
  resolve(impl)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use(impl):
      return fn(*args, **kwargs)
  return wrapped


BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


def cpu_has_bf16(cpuinfo: str = '/proc/cpuinfo') -> bool:
  """Whether the host CPU has bfloat16 instructions (AVX-512 BF16 or AMX), read from ``cpuinfo``."""
  try:
    with open(cpuinfo) as f:
      flags = f.read()
  except OSError:
    return False
  return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def compute_dtype(dtype: str = 'auto') -> str:
  """``'auto'`` → ``'bfloat16'`` on GPU/TPU and on CPUs with bf16 instructions (there bf16 steps run
  1.2–1.5× faster, benchmarks/RESULTS.md), ``'float32'`` on other CPUs (where bf16 is 1.4× slower);
  ``'float32'`` / ``'bfloat16'`` as given."""
  if dtype != 'auto':
    return dtype
  if jax.default_backend() != 'cpu':
    return 'bfloat16'
  return 'bfloat16' if cpu_has_bf16() else 'float32'


def unrolled_loops(impl: str = 'auto') -> bool:
  """Whether short loops over convolutions (gradient accumulation) should be unrolled: on the CPU
  kernels ('gemm'), since XLA:CPU runs convolutions inside loop bodies several times slower;
  elsewhere a ``lax.scan`` keeps compile time flat in the number of iterations."""
  return resolve(impl) == 'gemm'


def prepare_host(impl: str = 'auto') -> bool:
  """On CPU (``impl`` resolving to 'gemm'), keeps freed host memory for XLA:CPU's per-step
  temporaries (:mod:`ghl_jax.kernels.host_memory`); returns whether it changed anything."""
  if resolve(impl) != 'gemm' or jax.default_backend() != 'cpu':
    return False
  return kernels.host_memory.keep_freed_memory()
