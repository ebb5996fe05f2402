"""CIFAR10 · deephebb · GHL and every ablation as one sweep (launch/sweep.py; see baselines.ghl_ablation_sweep)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.ghl_ablation_sweep(arg)
