"""CIFAR10 · deephebb · GHL ablation 'softhebb_losers' (see baselines.ABLATIONS)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation('softhebb_losers', arg)
