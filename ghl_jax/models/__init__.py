"""Model zoo: plain flax.linen modules that know nothing about GHL, and a name registry.

Every model is called as ``model.apply(variables, images, train=...)`` on NHWC float images
and returns float32 logits; ``dtype`` is the compute dtype (params stay float32).
"""
from __future__ import annotations

import dataclasses
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
           'VGG', 'VGG16', 'ViT', 'ViTB16', 'ViTTiny', 'build', 'check_kwargs', 'names', 'register']


def register(name: str, constructor: Callable) -> None:
  """Adds a model constructor under ``name`` (used by ``build`` and configs)."""
  _REGISTRY[name] = constructor


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(name: str, **kwargs):
  """The registered model ``name`` built with ``kwargs`` (checked by :func:`check_kwargs`); unknown
  names list the known ones."""
  check_kwargs(name, kwargs)
  return _REGISTRY[name](**kwargs)


def check_kwargs(name: str, kwargs: dict) -> None:
  """Raises ValueError (one line) for a keyword that model ``name`` does not have or a number out of
  range: ``*_rate`` in [0, 1), every other number (width, depth, sizes, counts) > 0, integer fields
  integers. A registered constructor that is not a flax module is not checked."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; known models: {", ".join(names())}.')
  module = _REGISTRY[name]
  while isinstance(module, functools.partial):
    module = module.func
  if not dataclasses.is_dataclass(module):
    return
  fields = {f.name: f for f in dataclasses.fields(module) if f.name not in ('parent', 'name')}
  for key, value in kwargs.items():
    if key not in fields:
      raise ValueError(f'{name} has no setting {key!r}; its settings: {", ".join(sorted(fields))}.')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    wants_int = fields[key].type in (int, 'int')
    if key.endswith('_rate'):
      if not 0 <= value < 1:
        raise ValueError(f'{name}: {key} must be >= 0 and < 1, got {value!r}.')
    elif not value > 0 or (wants_int and not isinstance(value, int)):
      raise ValueError(f'{name}: {key} must be {"an integer " if wants_int else ""}> 0, got {value!r}.')
