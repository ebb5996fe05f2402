"""CIFAR100 · fasthebb · HPCA-FH: Hebbian convs, then a supervised head (see baselines.cifar_fasthebb)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.cifar_fasthebb('cifar100', 'hpca', arg)
