"""CIFAR10 · deephebb · GHL ablation 'ghl_dense' (see baselines.ABLATIONS)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation('ghl_dense', arg)
