"""Initializers and small pieces shared by the models (PyTorch-equivalent defaults)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

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


def batch_norm(train: bool, *, affine: bool = True, dtype=jnp.float32, name=None, scale_init=None):
  """BatchNorm with PyTorch defaults: momentum 0.1 (flax 0.9), eps 1e-5, batch stats in training."""
  kwargs = {} if scale_init is None else {'scale_init': scale_init}
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_bias=affine, use_scale=affine, dtype=dtype, name=name, **kwargs)


def scaled(width: float, channels: int) -> int:
  """Channel count under a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))
