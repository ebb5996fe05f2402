"""CIFAR10 · deephebb · GHL ablation 'no_competition' (see baselines.ABLATIONS)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation('no_competition', arg)
