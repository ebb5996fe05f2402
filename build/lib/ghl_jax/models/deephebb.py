"""DeepHebb: the 3-conv CIFAR net of SoftHebb, as trained by GHL (algorithm.md §2.1).

    [BN → conv5×5 96 → ReLU → maxpool 4/2/1] → [BN → conv3×3 384 → ReLU → maxpool 4/2/1]
    → [BN → conv3×3 1536 → ReLU → avgpool 2/2] → flatten (NHWC) → dropout → linear

BatchNorms have no affine parameters; convs have no bias and Kaiming-normal fan-in init.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ghl_jax.models.layers import MaxPool, batch_norm, he_normal, scaled, torch_bias, torch_kernel

CHANNELS = (96, 384, 1536)
KERNELS = (5, 3, 3)


def _max_pool(x):
  return MaxPool((4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))(x)


def _avg_pool(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DeepHebb(nn.Module):
  """DeepHebb with params ``conv1``, ``conv2``, ``conv3``, ``classifier``."""
  num_classes: int = 10
  dropout_rate: float = 0.5
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = images.astype(self.dtype)
    for i, (channels, k, pool) in enumerate(zip(CHANNELS, KERNELS, (_max_pool, _max_pool, _avg_pool)), 1):
      x = batch_norm(train, affine=False, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.Conv(scaled(self.width, channels), (k, k), padding=k // 2, use_bias=False,
                  kernel_init=he_normal, dtype=self.dtype, name=f'conv{i}')(x)
      x = pool(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=torch_kernel, bias_init=torch_bias(x.shape[-1]),
                      dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)
