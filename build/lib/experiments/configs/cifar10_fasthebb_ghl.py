"""CIFAR10 · fasthebb · GHL: a row of the paper's CIFAR table (see recipes.cifar)."""
from experiments.configs import recipes


def get_config(arg=None):
  return recipes.cifar('cifar10', 'fasthebb', 'ghl', arg)
