"""ImageNet · ViT-B/16 · ghl (see transformer.vit_imagenet)."""
from experiments.configs import transformer


def get_config(arg=None):
  return transformer.vit_imagenet('ghl', arg)
