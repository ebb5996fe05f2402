"""CIFAR100 · deephebb · SoftHebb: unsupervised SoftHebb, then a linear probe (see baselines.cifar_softhebb)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.cifar_softhebb('cifar100', arg)
