"""Vision Transformer (Dosovitskiy et al. 2021), pre-norm, class token, learned position embedding.

    patch_conv (p×p, stride p) → [cls; patches] + pos_embedding
    → depth × [x + attention(LN(x)); x + MLP(LN(x))] → LN → classifier(cls token)

    attention(x) = out(concat_h softmax(q_h k_hᵀ / sqrt(d_h)) v_h),  q, k, v = query(x), key(x), value(x)
    MLP(x) = mlp_out(GELU(mlp_in(x)))

Every projection is a plain nn.Dense (``query``, ``key``, ``value``, ``out``, ``mlp_in``,
``mlp_out``), so taps see each of them. The ``depth`` identical blocks run as one nn.scan
(params ``encoder/...`` stacked on a leading axis of size ``depth``). Init as timm: linears
truncated-normal std 0.02 with zero bias, position embedding std 0.02, class token 0, patch
conv with PyTorch's default init.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghl_jax.models.layers import Repeatable, run_repeated, torch_bias, torch_kernel

LN_EPSILON = 1e-6
linear_init = nn.initializers.truncated_normal(0.02)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=linear_init, dtype=dtype, name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention from four nn.Dense projections (softmax in float32)."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    head_dim = width // self.heads
    split = lambda name: _dense(width, self.dtype, name)(x).reshape(batch, tokens, self.heads, head_dim)
    q, k, v = split('query'), split('key'), split('value')
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    mixed = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, tokens, width)
    return _dense(width, self.dtype, 'out')(mixed)


class EncoderBlock(Repeatable):
  """``x + attention(LN(x))`` then ``x + MLP(LN(x))``, with dropout after each branch."""
  heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  train: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    drop = nn.Dropout(self.dropout_rate, deterministic=not self.train)
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='ln1')(x)
    x = x + drop(SelfAttention(self.heads, self.dtype, name='attention')(y))
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='ln2')(x)
    y = nn.gelu(_dense(self.mlp_dim, self.dtype, 'mlp_in')(y), approximate=False)
    y = _dense(x.shape[-1], self.dtype, 'mlp_out')(drop(y))
    return x + drop(y)


class ViT(nn.Module):
  """ViT with params ``patch_conv``, ``cls_token``, ``pos_embedding``, ``encoder`` (scanned
  blocks), ``ln_final``, ``classifier``. Defaults: ViT-B/16 (86.6M params at 1000 classes);
  ``hidden_dim`` is the token width."""
  num_classes: int = 1000
  patch_size: int = 16
  hidden_dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'ViT image size {images.shape[1:3]} must be a multiple of patch_size={p}.')
    if self.hidden_dim % self.heads:
      raise ValueError(f'ViT hidden_dim={self.hidden_dim} must be a multiple of heads={self.heads}.')
    patch_fan_in = p * p * images.shape[-1]
    x = nn.Conv(self.hidden_dim, (p, p), strides=p, padding='VALID', kernel_init=torch_kernel,
                bias_init=torch_bias(patch_fan_in), dtype=self.dtype, name='patch_conv')(
                    images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.hidden_dim)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.hidden_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_dim)).astype(self.dtype), x], 1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.hidden_dim))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos.astype(self.dtype))
    x = run_repeated(EncoderBlock, self.depth, x, remat=self.remat, name='encoder', heads=self.heads,
                     mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, train=train, dtype=self.dtype)
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='ln_final')(x[:, 0])
    logits = _dense(self.num_classes, self.dtype, 'classifier')(x)
    return logits.astype(jnp.float32)


class ViTB16(ViT):
  """ViT-B/16 for 224×224 ImageNet: patch 16, hidden 768, depth 12, 12 heads, MLP 3072."""


class ViTTiny(ViT):
  """ViT-Tiny for 32×32 CIFAR: patch 4, hidden 192, depth 12, 3 heads, MLP 768 (DeiT-Ti sizes)."""
  num_classes: int = 10
  patch_size: int = 4
  hidden_dim: int = 192
  heads: int = 3
  mlp_dim: int = 768
