"""ImageNet · fasthebb · SWTA-FH (see baselines.imagenet_fasthebb)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.imagenet_fasthebb('swta', arg)
