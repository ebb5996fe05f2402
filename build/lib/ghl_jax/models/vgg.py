"""VGG-16 (configuration D of Simonyan & Zisserman), equivalent to torchvision's ``vgg16(_bn)``.

    5 stages of conv3×3 (pad 1, bias) [→ BN] → ReLU, each closed by maxpool 2:
      64×2, 128×2, 256×3, 512×3, 512×3
    → adaptive avgpool 7×7 → flatten → fc1 4096 → ReLU → dropout → fc2 4096 → ReLU → dropout
    → classifier

Init as torchvision: convs Kaiming-normal fan-out with zero bias, linears ``N(0, 0.01²)`` with
zero bias, BN scale 1 / bias 0. Any input of at least 32×32 works: the adaptive pool maps the
last feature map to 7×7 (at 224×224 it is the identity).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ghl_jax.models.layers import MaxPool, adaptive_avg_pool, batch_norm, he_normal_fan_out, scaled

STAGES_D = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
HIDDEN = 4096
POOLED_SIZE = (7, 7)
linear_normal = nn.initializers.normal(0.01)


class VGG(nn.Module):
  """VGG with params ``conv{stage}_{index}`` (and ``bn{stage}_{index}``), ``fc1``, ``fc2``,
  ``classifier``."""
  stages: Sequence[Sequence[int]] = STAGES_D
  num_classes: int = 1000
  batch_norm: bool = False
  dropout_rate: float = 0.5
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = images.astype(self.dtype)
    for s, stage in enumerate(self.stages, 1):
      for i, channels in enumerate(stage, 1):
        x = nn.Conv(scaled(self.width, channels), (3, 3), padding=1, kernel_init=he_normal_fan_out,
                    dtype=self.dtype, name=f'conv{s}_{i}')(x)
        if self.batch_norm:
          x = batch_norm(train, dtype=self.dtype, name=f'bn{s}_{i}')(x)
        x = nn.relu(x)
      x = MaxPool((2, 2), strides=(2, 2))(x)
    x = adaptive_avg_pool(x, POOLED_SIZE).reshape(x.shape[0], -1)
    for name in ('fc1', 'fc2'):
      x = nn.Dense(scaled(self.width, HIDDEN), kernel_init=linear_normal, dtype=self.dtype, name=name)(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    logits = nn.Dense(self.num_classes, kernel_init=linear_normal, dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)


class VGG16(VGG):
  """torchvision ``vgg16`` (138.36M params at 1000 classes); ``batch_norm=True`` is ``vgg16_bn``."""
