"""CIFAR10 · CPU-sized ViT-Tiny · ghl on 'patch' kernels (see transformer.vit_cifar)."""
from experiments.configs import transformer


def get_config(arg=None):
  return transformer.vit_cifar('ghl', 'patch', arg)
