"""Accuracy study: GHL vs BP with a config's recipe for a fixed budget, as a markdown table.

    python benchmarks/accuracy_study.py --dataset=cifar10 --model=deephebb --epochs=1 \
        --data_dir=tfds_data --workdir_root=workdirs/study

Runs ``experiments/configs/{dataset}_{model}_{ghl,bp}.py`` one after the other through
``train_and_evaluate`` (resuming if interrupted) and prints test top-1, images/s and the paper's
number for the full 100-epoch recipe.
"""
from __future__ import annotations

import importlib
import json
import time

from absl import app
from absl import flags

from experiments.configs import common
from ghl_jax.train import data as data_lib
from ghl_jax.train import metrics
from ghl_jax import train

flags.DEFINE_string('dataset', 'cifar10', 'cifar10 | cifar100 | fashion_mnist')
flags.DEFINE_string('model', 'deephebb', 'deephebb | fasthebb')
flags.DEFINE_float('epochs', 1.0, 'Training budget in epochs (the paper trains 100).')
flags.DEFINE_float('width', 1.0, 'Width multiplier of the model.')
flags.DEFINE_string('data_dir', None, 'tfds data_dir holding the dataset.')
flags.DEFINE_string('workdir_root', 'workdirs/study', 'Each run writes to WORKDIR_ROOT/<dataset>_<model>_<method>.')
flags.DEFINE_string('methods', 'ghl,bp', 'Comma-separated methods (config file suffixes).')
FLAGS = flags.FLAGS


def study_config(method: str):
  module = importlib.import_module(f'experiments.configs.{FLAGS.dataset}_{FLAGS.model}_{method}')
  config = module.get_config()
  config.data.name = FLAGS.dataset
  config.data.data_dir = FLAGS.data_dir
  config.model.kwargs.width = FLAGS.width
  per_epoch = data_lib.steps_per_epoch(config.data, config.batch_size)
  config.num_train_steps = max(1, int(FLAGS.epochs * per_epoch))
  config.eval_every_steps = config.num_train_steps
  config.checkpoint_every_steps = 100
  config.log_every_steps = 25
  return config


def train_images_per_second(workdir: str, batch_size: int) -> float:
  """Median images/s over the logged training intervals (from the JSONL timestamps)."""
  rows = [r for r in metrics.read(workdir) if 'time' in r]
  rates = [batch_size * (b['step'] - a['step']) / (b['time'] - a['time'])
           for a, b in zip(rows, rows[1:]) if b['time'] > a['time'] and b['step'] > a['step']]
  rates.sort()
  return rates[len(rates) // 2] if rates else float('nan')


def main(argv):
  del argv
  rows = []
  for method in FLAGS.methods.split(','):
    config = study_config(method)
    workdir = f'{FLAGS.workdir_root}/{FLAGS.dataset}_{FLAGS.model}_{method}'
    start = time.time()
    final = train.train_and_evaluate(config, workdir)
    rows.append((method, config.num_train_steps, final, time.time() - start,
                 train_images_per_second(workdir, config.batch_size)))
  print(f'\n{FLAGS.dataset} · {FLAGS.model} (width {FLAGS.width}) · {FLAGS.epochs:g} epoch(s)\n')
  print('| method | steps | test top-1 (%) | test top-5 (%) | train img/s | wall (min) | paper, 100 epochs (%) |')
  print('|---|---|---|---|---|---|---|')
  for method, steps, final, wall, rate in rows:
    paper = common.PAPER.get((FLAGS.dataset, FLAGS.model, method), '–')
    print(f"| {method.upper()} | {steps} | {100 * final['eval/top1']:.2f} | {100 * final['eval/top5']:.2f} | "
          f'{rate:.1f} | {wall / 60:.1f} | {paper} |')
  print(json.dumps({m: f for m, _, f, _, _ in rows}))


if __name__ == '__main__':
  app.run(main)
