"""DeepHebbSoftHebb: DeepHebb as SoftHebb built it (algorithm.md §3.1, §5).

Same layers, names and pools as :class:`~ghl_jax.models.deephebb.DeepHebb`, with SoftHebb's
choices instead of GHL's:

* Triangle activation ``f(u) = ReLU(u − mean_channels(u))^p`` with ``p = 0.7, 1.4, 1.0``;
* reflect padding (``k // 2`` on each side) instead of zeros;
* conv init ``W ~ N(0, (25 / sqrt(fan_in))²)`` (initial neuron norm ≈ 25);
* classifier weights ``~ U[0, 0.1105)`` (bias: PyTorch default).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghl_jax.models.deephebb import CHANNELS, KERNELS, _avg_pool, _max_pool
from ghl_jax.models.layers import batch_norm, scaled, torch_bias

POWERS = (0.7, 1.4, 1.0)
# std = 25 / sqrt(fan_in)  <=>  variance = 625 / fan_in.
large_radius_normal = nn.initializers.variance_scaling(625.0, 'fan_in', 'normal')
CLASSIFIER_BOUND = 0.11048543456039805  # SoftHebb's classifier init bound.


def triangle(u: jax.Array, power: float) -> jax.Array:
  """``ReLU(u − mean_channels(u))^power``, the mean taken over the last (channel) axis.

  The power is applied only where the centred input is positive, so the gradient is 0 (not
  NaN) at and below the threshold for ``power < 1``.
  """
  centred = u - jnp.mean(u, axis=-1, keepdims=True)
  if power == 1:
    return jax.nn.relu(centred).astype(u.dtype)
  positive = centred > 0
  return jnp.where(positive, jnp.where(positive, centred, 1) ** power, 0).astype(u.dtype)


def uniform_classifier(key, shape, dtype=jnp.float32):
  """``U[0, 0.1105)``, SoftHebb's classifier init."""
  return jax.random.uniform(key, shape, dtype, 0.0, CLASSIFIER_BOUND)


class DeepHebbSoftHebb(nn.Module):
  """SoftHebb's DeepHebb with params ``conv1``, ``conv2``, ``conv3``, ``classifier``."""
  num_classes: int = 10
  dropout_rate: float = 0.5
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = images.astype(self.dtype)
    layers = zip(CHANNELS, KERNELS, POWERS, (_max_pool, _max_pool, _avg_pool))
    for i, (channels, k, power, pool) in enumerate(layers, 1):
      x = batch_norm(train, affine=False, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.Conv(scaled(self.width, channels), (k, k), padding='REFLECT', use_bias=False,
                  kernel_init=large_radius_normal, dtype=self.dtype, name=f'conv{i}')(x)
      x = pool(triangle(x, power))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=uniform_classifier,
                      bias_init=torch_bias(x.shape[-1]), dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32)
