"""ResNets of He et al. (2016): blocks shared with the CIFAR ResNets, and torchvision's
ImageNet ResNet-18 / ResNet-50 (v1.5: the stride of a bottleneck sits on its 3×3 conv).

    stem: conv7×7/2 64 → BN → ReLU → maxpool 3/2      (small_input: conv3×3/1, no maxpool)
    4 stages of blocks, 64/128/256/512 planes, the first block of stages 2–4 with stride 2
    → global avgpool → classifier

Convs are bias-free, Kaiming-normal fan-out; BN scale 1 / bias 0 (``zero_init_residual``
zeroes the scale of each block's last BN); the classifier has PyTorch's default init.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghl_jax.models.layers import MaxPool, Repeatable, batch_norm, he_normal_fan_out, scaled, torch_dense

SHORTCUTS = ('A', 'B')


def conv(features: int, kernel: int, strides: int = 1, *, init=he_normal_fan_out, dtype, name: str):
  """Bias-free ``kernel×kernel`` conv with padding ``kernel // 2``."""
  return nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
                 kernel_init=init, dtype=dtype, name=name)


def pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option A shortcut (parameter-free): ``x[:, ::s, ::s, :]`` with zero channels added on
  both sides (half of the missing channels before, the rest after)."""
  x = x[:, ::strides, ::strides, :]
  missing = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))


class _Block(Repeatable):
  """Residual block: ``relu(branch(x) + shortcut(x))``; a subclass defines ``_branch``.

  When the shape changes, the shortcut is option ``'B'`` (``shortcut_conv`` 1×1 with stride,
  then ``shortcut_bn``) or option ``'A'`` (:func:`pad_shortcut`).
  """
  planes: int
  strides: int = 1
  train: bool = False
  shortcut: str = 'B'
  zero_init_residual: bool = False
  conv_init: Callable = he_normal_fan_out
  dtype: jnp.dtype = jnp.float32
  expansion = 1

  def _norm(self, name: str, last: bool = False):
    scale_init = nn.initializers.zeros if last and self.zero_init_residual else None
    return batch_norm(self.train, dtype=self.dtype, name=name, scale_init=scale_init)

  def _conv(self, features: int, kernel: int, strides: int = 1, *, name: str):
    return conv(features, kernel, strides, init=self.conv_init, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x):
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}.')
    features = self.planes * self.expansion
    residual = x
    if self.strides != 1 or x.shape[-1] != features:
      if self.shortcut == 'A':
        residual = pad_shortcut(x, features, self.strides)
      else:
        residual = self._conv(features, 1, self.strides, name='shortcut_conv')(x)
        residual = self._norm('shortcut_bn')(residual)
    return nn.relu(self._branch(x) + residual)


class BasicBlock(_Block):
  """conv3×3 (stride) → BN → ReLU → conv3×3 → BN; params ``conv1``, ``bn1``, ``conv2``, ``bn2``."""

  def _branch(self, x):
    y = nn.relu(self._norm('bn1')(self._conv(self.planes, 3, self.strides, name='conv1')(x)))
    return self._norm('bn2', last=True)(self._conv(self.planes, 3, name='conv2')(y))


class Bottleneck(_Block):
  """conv1×1 → BN → ReLU → conv3×3 (stride) → BN → ReLU → conv1×1 (4× planes) → BN."""
  expansion = 4

  def _branch(self, x):
    y = nn.relu(self._norm('bn1')(self._conv(self.planes, 1, name='conv1')(x)))
    y = nn.relu(self._norm('bn2')(self._conv(self.planes, 3, self.strides, name='conv2')(y)))
    return self._norm('bn3', last=True)(self._conv(self.planes * 4, 1, name='conv3')(y))


class ResNet(nn.Module):
  """ImageNet ResNet with params ``stem_conv``, ``stem_bn``, ``stage{s}_block{b}``, ``classifier``.

  ``small_input=True`` swaps the stem for a stride-1 conv3×3 without maxpool (CIFAR-sized inputs).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type = BasicBlock
  num_classes: int = 1000
  small_input: bool = False
  zero_init_residual: bool = False
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = images.astype(self.dtype)
    stem_kernel, stem_strides = (3, 1) if self.small_input else (7, 2)
    x = conv(scaled(self.width, 64), stem_kernel, stem_strides, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    if not self.small_input:
      x = MaxPool((3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x)
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = self.block(scaled(self.width, 64 * 2**s), strides=2 if s > 0 and b == 0 else 1, train=train,
                       zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                       name=f'stage{s + 1}_block{b}')(x)
    x = jnp.mean(x, axis=(1, 2))
    logits = torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)


class ResNet18(ResNet):
  """torchvision ``resnet18`` (11.69M params at 1000 classes)."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type = BasicBlock


class ResNet50(ResNet):
  """torchvision ``resnet50`` v1.5 (25.56M params at 1000 classes)."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: type = Bottleneck
