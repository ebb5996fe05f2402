"""CIFAR10 · CPU-sized ViT-Tiny · bp on 'attn_mlp' kernels (see transformer.vit_cifar)."""
from experiments.configs import transformer


def get_config(arg=None):
  return transformer.vit_cifar('bp', 'attn_mlp', arg)
