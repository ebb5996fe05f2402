"""Plain-numpy reference of the local rules, written from algorithm.md with an explicit im2col.

A tapped layer (``nn.Dense`` or N-d ``nn.Conv``) is turned into *sites*: one row per sample ×
output position. For a conv with ``G`` feature groups the input patch of a site is ``X[n, g]``
(kernel offsets then channels, the order of ``kernel.reshape(-1, K)``), the kernel is split
into ``W[g]`` of shape ``(D_g, K_g)``, and ``u[n, g·K_g + k] = X[n, g] · W[g][:, k] (+ b)``.
Every rule is then written in the matrix form of algorithm.md, in float64:

    softmax_oja:  y = softmax(t_inv · u);   H_k = Σ_n y_nk X_n − (Σ_n y_nk u_nk) W_k
    softhebb:     y = ±softmax(t_inv · u)   (+ for the argmax site winner, − for losers)
    swta:         r = softmax(t_inv · s), c = r / Σ_n r;   H_k = Σ_n c_nk X_n − (Σ_n c_nk) W_k
    hpca:         y = ReLU(u);   H = (Xᵀ Y − W tril(YᵀY)ᵀ) / N   (within each group)
    oja:          y = u;   hebb: H = Xᵀ u

The geometry (strides, padding, dilation, groups) is read from the ``fields`` of a tapped
``Layer`` (or of a hand-made :class:`Geometry`); nothing else of ghl_jax is used.
"""
from __future__ import annotations

import itertools

import numpy as np


def _tuple(value, ndim):
  if isinstance(value, int):
    return (value,) * ndim
  return tuple(value)


def padding_pairs(padding, in_spatial, kernel_spatial, strides, dilation):
  """Explicit ``(low, high)`` zero padding per spatial axis (XLA's SAME convention)."""
  ndim = len(in_spatial)
  if isinstance(padding, str):
    if padding == 'VALID':
      return [(0, 0)] * ndim
    if padding != 'SAME':
      raise NotImplementedError(padding)
    pairs = []
    for size, k, s, d in zip(in_spatial, kernel_spatial, strides, dilation):
      out = -(-size // s)
      total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
      pairs.append((total // 2, total - total // 2))
    return pairs
  if isinstance(padding, int):
    return [(padding, padding)] * ndim
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def im2col(x, kernel_spatial, strides=1, padding='VALID', dilation=1):
  """Patches ``(B, *out_spatial, *kernel_spatial, C)`` of a channels-last input, by loops."""
  x = np.asarray(x, np.float64)
  ndim = x.ndim - 2
  strides, dilation = _tuple(strides, ndim), _tuple(dilation, ndim)
  pads = padding_pairs(padding, x.shape[1:-1], kernel_spatial, strides, dilation)
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  out_spatial = [(xp.shape[1 + i] - (kernel_spatial[i] - 1) * dilation[i] - 1) // strides[i] + 1
                 for i in range(ndim)]
  patches = np.zeros((x.shape[0], *out_spatial, *kernel_spatial, x.shape[-1]))
  for pos in itertools.product(*(range(o) for o in out_spatial)):
    for off in itertools.product(*(range(k) for k in kernel_spatial)):
      index = tuple(p * s + o * d for p, s, o, d in zip(pos, strides, off, dilation))
      patches[(slice(None),) + pos + off] = xp[(slice(None),) + index]
  return patches


class Geometry:
  """Conv geometry with the field names of a tapped ``Layer`` (for layers built by hand)."""

  def __init__(self, kernel_size, strides=1, padding='SAME', kernel_dilation=1,
               feature_group_count=1):
    self.fields = (('kernel_size', tuple(kernel_size)), ('strides', strides),
                   ('padding', padding), ('input_dilation', 1),
                   ('kernel_dilation', kernel_dilation),
                   ('feature_group_count', feature_group_count))


class Sites:
  """A layer's input patches ``X (N, G, D_g)``, kernel blocks ``W (G, D_g, K_g)`` and ``u (N, K)``."""

  def __init__(self, x, kernel, layer, bias=None):
    fields = dict(layer.fields)
    kernel = np.asarray(kernel, np.float64)
    self.kernel_shape = kernel.shape
    features = kernel.shape[-1]
    if 'kernel_size' in fields:
      assert _tuple(fields['input_dilation'], kernel.ndim - 2) == (1,) * (kernel.ndim - 2)
      groups = fields['feature_group_count']
      patches = im2col(x, kernel.shape[:-2], fields['strides'], fields['padding'],
                       fields['kernel_dilation'])
      self.out_shape = patches.shape[:x.ndim - 1] + (features,)
      n = int(np.prod(self.out_shape[:-1]))
      per_group = kernel.shape[-2]
      patches = patches.reshape(n, -1, groups, per_group)          # (N, taps, G, C_g)
      self.x = patches.transpose(0, 2, 1, 3).reshape(n, groups, -1)  # (N, G, taps·C_g)
    else:
      groups = 1
      self.out_shape = np.shape(x)[:-1] + (features,)
      self.x = np.asarray(x, np.float64).reshape(-1, 1, kernel.shape[0])
    self.groups = groups
    flat = kernel.reshape(-1, groups, features // groups)           # (D_g, G, K_g)
    self.w = flat.transpose(1, 0, 2)                                # (G, D_g, K_g)
    u = np.einsum('ngd,gdk->ngk', self.x, self.w).reshape(len(self.x), features)
    self.u = u if bias is None else u + np.asarray(bias, np.float64)

  @property
  def n(self):
    return len(self.x)

  def outputs(self):
    """``u`` in the layer's output shape."""
    return self.u.reshape(self.out_shape)

  def to_kernel(self, blocks):
    """``(G, D_g, K_g)`` blocks back to the kernel's shape."""
    return blocks.transpose(1, 0, 2).reshape(self.kernel_shape)

  def correlate(self, y):
    """``Σ_n y_nk X_n`` as ``(G, D_g, K_g)`` blocks."""
    return np.einsum('ngd,ngk->gdk', self.x, y.reshape(self.n, self.groups, -1))

  def scale_kernel(self, per_neuron):
    """``per_neuron_k · W_k`` as blocks."""
    return self.w * per_neuron.reshape(self.groups, 1, -1)


def softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def oja_with(sites, y, decay=True):
  h = sites.correlate(y)
  if decay:
    h = h - sites.scale_kernel((y * sites.u).sum(0))
  return sites.to_kernel(h)


def softmax_oja(sites, t_inv=1.0, competition=True, decay=True):
  y = softmax(t_inv * sites.u) if competition else sites.u
  return oja_with(sites, y, decay)


def softhebb(sites, t_inv=1.0):
  s = softmax(t_inv * sites.u)
  winner = sites.u.argmax(-1)[:, None] == np.arange(sites.u.shape[1])[None, :]
  return oja_with(sites, np.where(winner, s, -s))


def oja(sites):
  return oja_with(sites, sites.u)


def hebb(sites):
  return sites.to_kernel(sites.correlate(sites.u))


def swta(sites, t_inv=50.0, similarity='cosine'):
  if similarity == 'cosine':
    patch_norm = np.linalg.norm(sites.x, axis=-1)                  # (N, G)
    w_norm = np.linalg.norm(sites.w, axis=1)                       # (G, K_g)
    s = sites.u.reshape(sites.n, sites.groups, -1) / (patch_norm[:, :, None] * w_norm[None])
    s = s.reshape(sites.n, -1)
  else:
    s = sites.u
  r = softmax(t_inv * s)
  c = r / r.sum(0)
  return sites.to_kernel(sites.correlate(c) - sites.scale_kernel(c.sum(0)))


def hpca(sites):
  y = np.maximum(sites.u, 0.0).reshape(sites.n, sites.groups, -1)
  blocks = []
  for g in range(sites.groups):
    yg = y[:, g]
    decay = sites.w[g] @ np.tril(yg.T @ yg).T
    blocks.append((sites.x[:, g].T @ yg - decay) / sites.n)
  return sites.to_kernel(np.stack(blocks))


RULES = {
    'softmax_oja': softmax_oja,
    'softhebb': softhebb,
    'swta': swta,
    'hpca': hpca,
    'oja': oja,
    'hebb': hebb,
}


def dense_softmax_oja(x, u, w, t_inv):
  """GHL's raw term of a dense layer: x (sites, C), u (sites, F), w (C, F), float64."""
  x, u, w = (np.asarray(a, np.float64) for a in (x, u, w))
  z = t_inv * u
  y = np.exp(z - z.max(-1, keepdims=True))
  y /= y.sum(-1, keepdims=True)
  return y.T.dot(x).T - (y * u).sum(0) * w


def max_normalize(h):
  """``Ĥ = H / max|H|``."""
  return h / np.abs(h).max()


def ghl_update(grad, h):
  """``sign(G) ⊙ |Ĥ|``."""
  return np.sign(np.asarray(grad, np.float64)) * np.abs(max_normalize(h))
