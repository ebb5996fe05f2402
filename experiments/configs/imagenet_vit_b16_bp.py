"""ImageNet · ViT-B/16 · bp (see transformer.vit_imagenet)."""
from experiments.configs import transformer


def get_config(arg=None):
  return transformer.vit_imagenet('bp', arg)
