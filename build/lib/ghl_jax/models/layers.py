"""Initializers and small pieces shared by the models (PyTorch-equivalent defaults, nn.scan stacks)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

# Kaiming-normal, fan-in, ReLU gain: std = sqrt(2 / fan_in) (torch.nn.init.kaiming_normal_).
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# torch.nn.Linear / Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias(fan_in: int):
  """Bias init of torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_dense(features: int, fan_in: int, *, dtype=jnp.float32, name=None) -> nn.Dense:
  """``torch.nn.Linear(fan_in, features)`` with its default init."""
  return nn.Dense(features, kernel_init=torch_kernel, bias_init=torch_bias(fan_in), dtype=dtype, name=name)


def batch_norm(train: bool, *, affine: bool = True, dtype=jnp.float32, name=None, scale_init=None):
  """BatchNorm with PyTorch defaults: momentum 0.1 (flax 0.9), eps 1e-5, batch stats in training."""
  kwargs = {} if scale_init is None else {'scale_init': scale_init}
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_bias=affine, use_scale=affine, dtype=dtype, name=name, **kwargs)


def scaled(width: float, channels: int) -> int:
  """Channel count under a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))

# torchvision's conv init (ResNet, VGG): Kaiming-normal, fan-out, ReLU gain: std = sqrt(2 / fan_out).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

SCAN_AXES = {'params': 0, 'batch_stats': 0, 'intermediates': 0}
SCAN_RNGS = {'params': True, 'dropout': True}


def _pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Rows average the bins ``[⌊i·n/m⌋, ⌈(i+1)·n/m⌉)`` of ``torch.nn.AdaptiveAvgPool``."""
  matrix = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    stop = -((-(i + 1) * size_in) // size_out)
    matrix[i, start:stop] = 1.0 / (stop - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``torch.nn.AdaptiveAvgPool2d(size)`` on NHWC: ``y[i, j] = mean of bin (i, j)`` of ``x``."""
  rows = jnp.asarray(_pool_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(_pool_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum('ih,jw,bhwc->bijc', rows, cols, x)


class Repeatable(nn.Module):
  """A block whose ``__call__(x) -> x`` keeps the shape, so copies of it can run under nn.scan."""

  def scan_step(self, x, _):
    return self(x), None


def repeated(block: type, length: int, *, remat: bool = False) -> type:
  """``length`` copies of ``block`` (a :class:`Repeatable`) applied in turn, as one nn.scan.

  Params, batch stats and intermediates (taps) get a leading axis of size ``length``; params
  and dropout draw separate rngs per copy. ``remat=True`` recomputes each block's activations
  in the backward pass instead of storing them. Call as
  ``repeated(Block, n)(**fields, name=...).scan_step(x, None)[0]``.
  """
  body = nn.remat(block, methods=['scan_step']) if remat else block
  return nn.scan(body, variable_axes=SCAN_AXES, split_rngs=SCAN_RNGS, length=length,
                 methods=['scan_step'])


def run_repeated(block: type, length: int, x: jax.Array, *, remat: bool = False, name: str,
                 **fields) -> jax.Array:
  """``x`` through ``length`` scanned copies of ``block(**fields)`` (identity if ``length`` is 0)."""
  if length == 0:
    return x
  return repeated(block, length, remat=remat)(name=name, **fields).scan_step(x, None)[0]


class MaxPool(nn.Module):
  """``nn.max_pool(x, window_shape, strides, padding)`` as a module (no variables), so a faster
  kernel can be swapped in from outside (:mod:`ghl_jax.accel`) without touching the model."""
  window_shape: tuple
  strides: tuple | None = None
  padding: str | tuple = 'VALID'

  def __call__(self, x):
    return nn.max_pool(x, self.window_shape, self.strides, self.padding)
