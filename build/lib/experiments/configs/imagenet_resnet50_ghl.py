"""ImageNet · resnet50 · GHL: a row of the paper's ImageNet table (see recipes.imagenet)."""
from experiments.configs import recipes


def get_config(arg=None):
  return recipes.imagenet('resnet50', 'ghl', arg)
