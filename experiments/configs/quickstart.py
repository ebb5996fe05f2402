"""Quickstart: DeepHebb (width 1/4) on Fashion-MNIST, GHL (default) or BP (``:method=bp``).

Sized to train in a few minutes on a 2-core CPU; the paper's recipe otherwise (two-group SGD,
lr_conv 1e-2, wd_conv 5e-2, lr 5e-3, cosine, batch 64, no augmentation).
"""
from experiments.configs import common


def get_config(arg=None):
  switches = common.parse_arg(arg, method='ghl', steps=600, width=0.25, runlocal=False)
  if switches.steps < 1:
    raise ValueError(f'Config switch steps={switches.steps} must be >= 1.')
  c = common.base()
  common.paper_recipe(c, 'deephebb')   # first: the recipe sets width 1.0, the quickstart its own
  c.method = switches.method
  c.model.name = 'deephebb'
  c.model.kwargs.width = switches.width
  c.data.update({'name': 'fashion_mnist', 'normalize': 'half'})
  c.num_train_steps = switches.steps
  c.log_every_steps = 50
  c.eval_every_steps = max(switches.steps // 3, 1)
  c.checkpoint_every_steps = 300
  c.eval_batch_size = 500
  if switches.runlocal:
    common.apply_runlocal(c)
  return c
