"""FastHebb: the 6-layer CIFAR net of Lagani et al., as trained by GHL (algorithm.md §2.2).

    conv5×5 96 → ReLU → maxpool 2 → BN    (32 → 28 → 14)
    conv3×3 128 → ReLU → BN               (14 → 12)
    conv3×3 192 → ReLU → maxpool 2 → BN   (12 → 10 → 5)
    conv3×3 256 → ReLU → BN               (5 → 3)
    flatten (NHWC) → fc5 4096 → ReLU → BN (affine) → dropout → linear

Convs are unpadded, bias-free, Kaiming-normal fan-in; their BatchNorms have no affine
parameters. ``fc5`` and ``classifier`` are ordinary linear layers with PyTorch's default init.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ghl_jax.models.layers import MaxPool, batch_norm, he_normal, scaled, torch_dense

CHANNELS = (96, 128, 192, 256)
KERNELS = (5, 3, 3, 3)
POOLED = (True, False, True, False)
HIDDEN = 4096


class FastHebb(nn.Module):
  """FastHebb with params ``conv1``…``conv4``, ``fc5``, ``bn5``, ``classifier``."""
  num_classes: int = 10
  dropout_rate: float = 0.5
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = images.astype(self.dtype)
    for i, (channels, k, pooled) in enumerate(zip(CHANNELS, KERNELS, POOLED), 1):
      x = nn.Conv(scaled(self.width, channels), (k, k), padding='VALID', use_bias=False,
                  kernel_init=he_normal, dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(x)
      if pooled:
        x = MaxPool((2, 2), strides=(2, 2))(x)
      x = batch_norm(train, affine=False, dtype=self.dtype, name=f'bn{i}')(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(torch_dense(scaled(self.width, HIDDEN), x.shape[-1], dtype=self.dtype, name='fc5')(x))
    x = batch_norm(train, dtype=self.dtype, name='bn5')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)
