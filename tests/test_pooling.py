"""kernels.pooling.max_pool against a plain-numpy max pool and its first-maximum gradient."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghl_jax.kernels.pooling import max_pool

# name -> (input shape, window, strides, padding)
CASES = {
    'deephebb_4x4_stride2_pad1': ((2, 9, 9, 3), (4, 4), (2, 2), ((1, 1), (1, 1))),
    'vgg_2x2_stride2': ((2, 8, 8, 3), (2, 2), (2, 2), 'VALID'),
    'resnet_3x3_stride2_pad1': ((2, 7, 7, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    'rect_same': ((2, 7, 6, 3), (3, 2), (1, 2), 'SAME'),
    'pool_1d': ((3, 9, 2), (3,), (2,), 'VALID'),
    'two_batch_axes': ((2, 2, 6, 6, 3), (3, 3), (1, 1), 'SAME'),
}


def np_max_pool(x, window, strides, padding, cotangent=None):
  """``(y, ∂x)``: each window's cotangent goes to its first maximum (row-major)."""
  x = np.asarray(x, np.float64)
  batch = x.shape[:x.ndim - len(window) - 1]
  x = x.reshape((-1,) + x.shape[len(batch):])
  spatial = x.shape[1:-1]
  if isinstance(padding, str):
    pads = []
    for n, w, s in zip(spatial, window, strides):
      out = -(-n // s) if padding == 'SAME' else (n - w) // s + 1
      total = max((out - 1) * s + w - n, 0) if padding == 'SAME' else 0
      pads.append((total // 2, total - total // 2))
  else:
    pads = list(padding)
  xp = np.pad(x, [(0, 0)] + pads + [(0, 0)], constant_values=-np.inf)
  out = [(n + lo + hi - w) // s + 1 for n, (lo, hi), w, s in zip(spatial, pads, window, strides)]
  y = np.zeros((x.shape[0], *out, x.shape[-1]))
  grad = np.zeros_like(xp)
  c = None if cotangent is None else np.asarray(cotangent, np.float64).reshape(y.shape)
  for b, ch in itertools.product(range(x.shape[0]), range(x.shape[-1])):
    for pos in itertools.product(*(range(o) for o in out)):
      best, where = -np.inf, None
      for off in itertools.product(*(range(w) for w in window)):
        index = tuple(p * s + o for p, s, o in zip(pos, strides, off))
        if xp[(b,) + index + (ch,)] > best:
          best, where = xp[(b,) + index + (ch,)], index
      y[(b,) + pos + (ch,)] = best
      if c is not None:
        grad[(b,) + where + (ch,)] += c[(b,) + pos + (ch,)]
  crop = tuple(slice(lo, lo + n) for n, (lo, _) in zip(spatial, pads))
  grad = grad[(slice(None),) + crop + (slice(None),)]
  return y.reshape(batch + y.shape[1:]), grad.reshape(batch + grad.shape[1:])


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('ties', [False, True])
def test_matches_numpy_and_flax(name, ties):
  shape, window, strides, padding = CASES[name]
  x = jax.random.normal(jax.random.key(0), shape)
  if ties:                                   # ReLU'd, rounded: many equal maxima per window
    x = jnp.round(jax.nn.relu(x) * 2)
  pool = jax.jit(lambda x: max_pool(x, window, strides, padding))
  y = pool(x)
  cotangent = jax.random.normal(jax.random.key(1), y.shape)
  pullback = lambda x, c: jax.vjp(lambda x: max_pool(x, window, strides, padding), x)[1](c)[0]
  grad = jax.jit(pullback)(x, cotangent)
  expected_y, expected_grad = np_max_pool(x, window, strides, padding, cotangent)
  np.testing.assert_allclose(y, expected_y, rtol=0, atol=0)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
  flax_grad = jax.vjp(lambda x: nn.max_pool(x, window, strides, padding), x)[1](cotangent)[0]
  np.testing.assert_allclose(grad, flax_grad, rtol=1e-6, atol=1e-6)


def test_bad_window_raises():
  with pytest.raises(ValueError, match='one entry per spatial axis'):
    max_pool(jnp.ones((1, 4, 4, 2)), (2, 2), strides=(2,))
