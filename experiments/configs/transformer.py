"""The Transformer study: ViT with GHL on attention + MLP, on the MLP only, on the patch embedding
only, against BP with the same optimizer, BP with AdamW and sign-SGD (``vit_cifar``), and the
ImageNet ViT-B/16 GHL/BP pair for accelerators (``vit_imagenet``).

GHL's competition is token-wise: every token is a site, and ``y = softmax(t_inv · u)`` runs over the
layer's output features at that token. ``T_INV`` was chosen so that at initialisation the softmax
over a token's neurons has a normalised entropy of about 0.5–0.8 (a soft competition with a few
winners per token), measured on 64 CIFAR-10 training images with the CPU-sized ViT: t_inv = 1 gives
0.99–1.00 (no competition) on every layer; 10 gives 0.68–0.77 on query/key/value/mlp_in and 0.45 on
the patch embedding; the attention output and mlp_out projections read small inputs and need 30
(0.91–0.96).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common

ATTENTION = r'encoder/attention/(query|key|value|out)/kernel'
MLP = r'encoder/mlp_(in|out)/kernel'
PATCH = r'patch_conv/kernel'
LAYERS = {'attn_mlp': f'{ATTENTION}|{MLP}', 'mlp': MLP, 'patch': PATCH}
T_INV = {'patch_conv': 5.0, r'attention/(query|key|value)': 10.0, 'mlp_in': 10.0,
         'attention/out': 30.0, 'mlp_out': 30.0}
# The CPU-sized ViT-Tiny: patch 4 on 32×32 (64 tokens + class token), 4 blocks of width 96.
CPU_VIT = {'depth': 4, 'hidden_dim': 96, 'heads': 3, 'mlp_dim': 384}
METHODS = ('ghl', 'bp', 'bp_adamw', 'signsgd')


def vit_cifar(method: str, layers: str = 'attn_mlp', arg=None) -> ml_collections.ConfigDict:
  """CIFAR-10, the CPU-sized ViT-Tiny, 400 steps of batch 64 (about 3 minutes on 2 CPU cores with
  compilation and two evaluations), crop + flip.

  ``method``: 'ghl' (GHL on ``LAYERS[layers]``, the paper's two-group SGD: lr_conv 1e-3, wd 5e-2 on
  them, lr 5e-2 elsewhere), 'bp' (the same two groups by backprop), 'bp_adamw' (AdamW lr 1e-3, wd
  0.05, the usual ViT recipe) or 'signsgd' (sign(G) with unit magnitude on the same kernels).
  """
  if method not in METHODS or layers not in LAYERS:
    raise ValueError(f'vit_cifar method must be one of {METHODS} and layers one of {sorted(LAYERS)}.')
  switches = common.parse_arg(arg, runlocal=False)
  c = common.base()
  c.model.name = 'vit_tiny'
  c.model.kwargs = ml_collections.ConfigDict(dict(CPU_VIT))
  c.data.update({'name': 'cifar10', 'augment': 'crop_flip'})
  c.batch_size, c.num_train_steps = 64, 400
  c.eval_every_steps, c.log_every_steps, c.checkpoint_every_steps = 200, 25, 200
  c.ghl.layers = LAYERS[layers]
  c.ghl.t_inv = ml_collections.ConfigDict(dict(T_INV))
  if method == 'bp_adamw':
    c.method = 'bp'
    c.optimizer.update({'name': 'adam', 'lr': 1e-3, 'weight_decay': 0.05})
  else:
    c.method = 'bp' if method == 'bp' else 'ghl'
    c.optimizer.update({'name': 'paper_sgd', 'lr': 5e-2, 'lr_conv': 1e-3, 'wd_conv': 5e-2})
    if method == 'signsgd':
      c.ghl.magnitude = 'unit'
  if switches.runlocal:
    common.apply_runlocal(c)
  return c


def vit_imagenet(method: str, arg=None) -> ml_collections.ConfigDict:
  """ImageNet, ViT-B/16 at 224×224: GHL on attention + MLP kernels (the paper's two-group SGD, lr
  0.1 / lr_conv 1e-3) or BP with AdamW (lr 1e-3 per 1024 images, wd 0.05, 10k warm-up steps is
  the usual recipe; here cosine over 300 epochs at batch 1024)."""
  switches = common.parse_arg(arg, runlocal=False)
  c = common.base()
  c.model.name = 'vit_b16'
  c.data.update({'name': 'imagenet2012', 'eval_split': 'validation', 'augment': 'inception',
                 'image_size': 224, 'normalize': 'imagenet'})
  c.batch_size, c.eval_batch_size, c.num_epochs = 1024, 1000, 300
  c.log_every_steps, c.checkpoint_every_steps = 100, 2500
  c.ghl.layers = LAYERS['attn_mlp']
  c.ghl.t_inv = ml_collections.ConfigDict(dict(T_INV))
  if method == 'ghl':
    c.method = 'ghl'
    c.optimizer.update({'name': 'paper_sgd', 'lr': 0.1, 'lr_conv': 1e-3, 'wd_conv': 5e-2})
  else:
    c.method = 'bp'
    c.optimizer.update({'name': 'adam', 'lr': 1e-3, 'weight_decay': 0.05})
  if switches.runlocal:
    common.apply_runlocal(c)
  return c
