"""ImageNet · fasthebb · HPCA-FH (see baselines.imagenet_fasthebb)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.imagenet_fasthebb('hpca', arg)
