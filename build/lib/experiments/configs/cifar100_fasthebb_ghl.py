"""CIFAR100 · fasthebb · GHL: a row of the paper's CIFAR table (see recipes.cifar)."""
from experiments.configs import recipes


def get_config(arg=None):
  return recipes.cifar('cifar100', 'fasthebb', 'ghl', arg)
