"""CIFAR10 · deephebb · GHL ablation 'signsgd' (see baselines.ABLATIONS)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation('signsgd', arg)
