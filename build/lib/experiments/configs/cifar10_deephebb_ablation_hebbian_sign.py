"""CIFAR10 · deephebb · GHL ablation 'hebbian_sign' (see baselines.ABLATIONS)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation('hebbian_sign', arg)
