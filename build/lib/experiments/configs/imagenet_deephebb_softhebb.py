"""ImageNet · deephebb · SoftHebb (see baselines.imagenet_softhebb)."""
from experiments.configs import baselines


def get_config(arg=None):
  return baselines.imagenet_softhebb(arg)
