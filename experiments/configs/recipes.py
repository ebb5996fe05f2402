"""Recipes behind the config files: one function per table of the paper.

Each config file is one row (dataset × model × method) and calls one of these; the text after
``:`` in ``--config=file.py:ARG`` accepts ``runlocal`` and the switches of each recipe.
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common

IMAGENET_DATA = {'name': 'imagenet2012', 'eval_split': 'validation', 'augment': 'inception',
                 'image_size': 224, 'normalize': 'imagenet'}


def _finish(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  switches = common.parse_arg(arg, runlocal=False)
  if switches.runlocal:
    common.apply_runlocal(c)
  return c


def cifar(dataset: str, model: str, method: str, arg=None) -> ml_collections.ConfigDict:
  """CIFAR table: DeepHebb / FastHebb × GHL / BP with the authors' recipe.

  100 epochs, batch 64, cosine per step, no augmentation, pixels in [-1, 1]. The BP row uses
  the same two-group SGD without the GHL replacement (the matching GHL optimizer).
  """
  c = common.base()
  c.method = method
  c.model.name = model
  c.data.name = dataset
  common.paper_recipe(c, model)
  c.checkpoint_every_steps = 2000
  return _finish(c, arg)


def imagenet(model: str, method: str, arg=None) -> ml_collections.ConfigDict:
  """ImageNet table. The paper gives no ImageNet hyper-parameters: BP uses the standard
  recipe (SGD Nesterov 0.9, lr 0.1 per 256, wd 1e-4, 5 warm-up epochs, cosine, 90 epochs);
  GHL uses the paper's two-group SGD (our choice of lr_conv 1e-2, wd_conv 5e-4).
  DeepHebb and FastHebb read 64×64 crops (their dense heads grow with resolution)."""
  c = common.base()
  c.method = method
  c.model.name = model
  c.data.update(IMAGENET_DATA)
  if model in common.WIDTH_MODELS:
    c.data.image_size = 64
    c.model.kwargs.width = 1.0
  c.batch_size, c.eval_batch_size, c.num_epochs = 256, 500, 90
  if method == 'ghl':
    c.optimizer.update({'name': 'paper_sgd', 'lr': 0.1, 'lr_conv': 1e-2, 'wd_conv': 5e-4})
  else:
    c.optimizer.update({'name': 'momentum_sgd', 'lr': 0.1, 'momentum': 0.9, 'nesterov': True,
                        'weight_decay': 1e-4, 'warmup_steps': 5 * 5004})
  c.log_every_steps, c.checkpoint_every_steps = 100, 2500
  return _finish(c, arg)


def cifar_resnet(method: str, arg=None) -> ml_collections.ConfigDict:
  """CIFAR-10 depth study, ResNet-(6n+2) for n = 3…200 (``:depth=1202``; sweep over all depths).

  BP: He et al.'s recipe (SGD momentum 0.9, wd 1e-4, batch 128, lr 0.1, crop + flip, 182
  epochs, cosine here instead of steps). GHL: the same data and length with the paper's
  two-group SGD on every conv kernel (lr_conv 1e-2, wd_conv 5e-4; the paper's recipe for this
  study is not published).
  """
  switches = common.parse_arg(arg, runlocal=False, depth=20)
  c = common.base()
  c.method = method
  c.model.name = f'resnet{switches.depth}'
  c.data.update({'name': 'cifar10', 'augment': 'crop_flip', 'normalize': 'dataset'})
  c.batch_size, c.num_epochs = 128, 182
  if method == 'ghl':
    c.optimizer.update({'name': 'paper_sgd', 'lr': 0.1, 'lr_conv': 1e-2, 'wd_conv': 5e-4})
  else:
    c.optimizer.update({'name': 'momentum_sgd', 'lr': 0.1, 'momentum': 0.9, 'nesterov': False,
                        'weight_decay': 1e-4})
  c.sweep = [{'model.name': f'resnet{d}'} for d in (20, 32, 44, 56, 110, 1202)]
  if switches.runlocal:
    common.apply_runlocal(c)
  return c
