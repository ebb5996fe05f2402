"""CIFAR-10 · ResNet-(6n+2) depth study · BP (`:depth=1202`; config.sweep lists every depth)."""
from experiments.configs import recipes


def get_config(arg=None):
  return recipes.cifar_resnet('bp', arg)
