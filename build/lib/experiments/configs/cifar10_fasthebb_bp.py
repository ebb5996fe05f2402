"""CIFAR10 · fasthebb · BP: a row of the paper's CIFAR table (see recipes.cifar)."""
from experiments.configs import recipes


def get_config(arg=None):
  return recipes.cifar('cifar10', 'fasthebb', 'bp', arg)
