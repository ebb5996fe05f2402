"""CIFAR ResNet-(6n+2) of He et al. (2016, §4.2), as in akamaster/pytorch_resnet_cifar10.

    conv3×3 16 → BN → ReLU
    → 3 stages of n basic blocks with 16, 32, 64 planes on 32², 16², 8² maps
      (the first block of stages 2 and 3 has stride 2)
    → global avgpool → classifier

n = 3, 5, 7, 9, 18, 200 gives ResNet-20/32/44/56/110/1202 (0.27M … 19.4M params, option A).
Shortcuts that change shape are option ``'A'`` (subsample + zero channels, parameter-free) or
``'B'`` (1×1 conv with stride + BN). Convs and classifier are Kaiming-normal fan-in.

The n − 1 identical blocks that follow the first block of a stage run as one nn.scan
(params ``stage{s}_blocks/...`` stacked on a leading axis of size n − 1), so compile time does
not grow with depth; ``remat=True`` recomputes their activations in the backward pass.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ghl_jax.models.layers import batch_norm, he_normal, run_repeated, scaled, torch_bias
from ghl_jax.models.resnet import SHORTCUTS, BasicBlock, conv

PLANES = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
  """``n`` of a ResNet-(6n+2); a depth that is not 6n+2 raises."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}.')
  return (depth - 2) // 6


class CifarResNet(nn.Module):
  """ResNet-``depth`` with params ``stem_conv``, ``stem_bn``, ``stage{s}_block0``,
  ``stage{s}_blocks`` (scanned), ``classifier``."""
  depth: int = 20
  num_classes: int = 10
  shortcut: str = 'A'
  remat: bool = False
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    n = blocks_per_stage(self.depth)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}.')
    x = images.astype(self.dtype)
    x = conv(scaled(self.width, PLANES[0]), 3, init=he_normal, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    for s, planes in enumerate(PLANES, 1):
      fields = dict(planes=scaled(self.width, planes), train=train, shortcut=self.shortcut,
                    conv_init=he_normal, dtype=self.dtype)
      x = BasicBlock(strides=1 if s == 1 else 2, name=f'stage{s}_block0', **fields)(x)
      x = run_repeated(BasicBlock, n - 1, x, remat=self.remat, name=f'stage{s}_blocks', **fields)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=he_normal, bias_init=torch_bias(x.shape[-1]),
                      dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)
