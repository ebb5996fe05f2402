"""CIFAR100 · deephebb · BP with Nesterov momentum (see baselines.cifar_bp_strong)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.cifar_bp_strong('cifar100', 'deephebb', arg)
