"""Model zoo: plain flax.linen modules that know nothing about GHL, and a name registry.

Every model is called as ``model.apply(variables, images, train=...)`` on NHWC float images
and returns float32 logits; ``dtype`` is the compute dtype (params stay float32).
"""
from __future__ import annotations

import functools
from typing import Callable

from ghl_jax.models.cifar_resnet import CifarResNet
from ghl_jax.models.deephebb import DeepHebb
from ghl_jax.models.fasthebb import FastHebb
from ghl_jax.models.resnet import ResNet, ResNet18, ResNet50
from ghl_jax.models.softhebb import DeepHebbSoftHebb
from ghl_jax.models.vgg import VGG, VGG16
from ghl_jax.models.vit import ViT, ViTB16, ViTTiny

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)

_REGISTRY: dict[str, Callable] = {
    'deephebb': DeepHebb,
    'deephebb_softhebb': DeepHebbSoftHebb,
    'fasthebb': FastHebb,
    'vgg16': functools.partial(VGG16, batch_norm=False),
    'vgg16_bn': functools.partial(VGG16, batch_norm=True),
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    **{f'resnet{depth}': functools.partial(CifarResNet, depth=depth) for depth in CIFAR_RESNET_DEPTHS},
    'vit_tiny': ViTTiny,
    'vit_b16': ViTB16,
}

__all__ = ['CifarResNet', 'DeepHebb', 'DeepHebbSoftHebb', 'FastHebb', 'ResNet', 'ResNet18', 'ResNet50',
           'VGG', 'VGG16', 'ViT', 'ViTB16', 'ViTTiny', 'build', 'names', 'register']


def register(name: str, constructor: Callable) -> None:
  """Adds a model constructor under ``name`` (used by ``build`` and configs)."""
  _REGISTRY[name] = constructor


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(name: str, **kwargs):
  """The registered model ``name`` built with ``kwargs``; unknown names list the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; known models: {", ".join(names())}.')
  return _REGISTRY[name](**kwargs)
