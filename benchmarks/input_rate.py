"""Is the input pipeline ever the bottleneck? The grain pipeline's CIFAR batch rate vs the train step's.

Measures, in one process and in this order:

1. the pipeline alone: batches/s that ``ghl_jax.data.train_batches`` delivers (after its first
   batch), with the experiment's data config (CIFAR-10, batch 64, no augmentation; ``--augment
   crop_flip`` for the strong baselines);
2. the GHL train step alone, on one fixed batch (DeepHebb, ``--width``);
3. the train step fed by the pipeline (as ``train_and_evaluate`` does), so grain's threads
   compete with the step for the same cores.

The pipeline is not the bottleneck when (1) is several times (2) and (3) is as fast as (2)::

    python -m benchmarks.input_rate --data_dir DATA_DIR
    python -m benchmarks.input_rate --data_dir DATA_DIR --sizes 16,64,128,256,1024   # the pipeline alone
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from benchmarks import step_time
from ghl_jax.train import data as data_lib
from ghl_jax import models
from ghl_jax.kernels import host_memory


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR'), help='tfds data_dir')
  parser.add_argument('--dataset', default='cifar10')
  parser.add_argument('--augment', default='none', choices=data_lib.pipeline.AUGMENTS)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--sizes', default='', help='comma-separated batch sizes: time the pipeline alone at '
                      'each (no train step), e.g. 16,64,128,256,1024')
  parser.add_argument('--batches', type=int, default=200, help='pipeline batches timed')
  parser.add_argument('--steps', type=int, default=5, help='train steps timed (alone and fed)')
  parser.add_argument('--width', type=float, default=1.0, help='DeepHebb width of the train step')
  parser.add_argument('--json', default='', help='also write the numbers to this JSON file')
  args = parser.parse_args(argv)
  if args.batches < 2 or args.steps < 1 or args.batch < 1:
    parser.error('--batches must be >= 2, --steps and --batch >= 1.')
  try:
    args.sizes = [int(size) for size in args.sizes.split(',') if size.strip()]
  except ValueError:
    parser.error(f'--sizes must be comma-separated integers, got {args.sizes!r}.')
  if any(size < 1 for size in args.sizes):
    parser.error('--sizes must be >= 1.')
  return args


def size_table(cfg, args) -> list:
  """The pipeline alone at each of ``args.sizes``: one row per batch size."""
  rows = []
  for size in args.sizes:
    rate = pipeline_rate(cfg, size, args.batches)
    rows.append({'batch': size, **rate})
    print(f"batch {size:5d}: {rate['images_per_s']:9.0f} images/s ({rate['batches_per_s']:.1f} batches/s, "
          f"first batch after {rate['first_batch_s']:.2f} s)", flush=True)
  return rows


def data_config(args):
  cfg = data_lib.default_config(args.dataset)
  cfg.data_dir, cfg.augment = args.data_dir, args.augment
  return cfg


def pipeline_rate(cfg, batch: int, count: int) -> dict:
  """Batches/s of the train stream alone (the first batch, which builds it, timed apart)."""
  start = time.perf_counter()
  batches = data_lib.train_batches(cfg, batch_size=batch, seed=0)
  first = next(batches)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  per_batch = (time.perf_counter() - start) / count
  return {'first_batch_s': first_s, 'batch_s': per_batch, 'batches_per_s': 1 / per_batch,
          'images_per_s': batch / per_batch, 'image_shape': tuple(first['image'].shape[1:])}


class GhlStep:
  """DeepHebb's donated GHL train step (as in :mod:`benchmarks.step_time`)."""

  def __init__(self, width: float, batch: dict):
    model = models.DeepHebb(num_classes=10, width=width)
    step, tx = step_time.build_step(model, step_time.VARIANTS['GHL'], step_time.DEEPHEBB_T_INV, 10_000)
    self.state = step_time.make_state(model, tx, batch)
    self.compiled = step.lower(self.state, batch).compile()

  def __call__(self, batch) -> float:
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, batch)
    step_time.block((self.state, metrics))
    return time.perf_counter() - start


def step_rates(cfg, args) -> dict:
  """Median step time on a fixed batch and fed by the pipeline (next batch to device each step),
  alternating so that machine load hits both alike."""
  batches = data_lib.train_batches(cfg, batch_size=args.batch, seed=1)
  fixed = {k: jnp.asarray(v) for k, v in next(batches).items()}
  step = GhlStep(args.width, fixed)
  step(fixed)                                              # warm-up
  alone, fed = [], []
  for _ in range(args.steps):
    alone.append(step(fixed))
    start = time.perf_counter()
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    step(batch)
    fed.append(time.perf_counter() - start)
  return {'step_alone_s': statistics.median(alone), 'step_fed_s': statistics.median(fed)}


def main(argv=None):
  args = parse_args(argv)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  host_memory.keep_freed_memory()
  cfg = data_config(args)
  load = ' '.join(f'{v:.2f}' for v in os.getloadavg())
  if args.sizes:
    print(f"{args.dataset} (augment {args.augment}), pipeline alone, {os.cpu_count()} CPUs, load average {load}")
    rows = size_table(cfg, args)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'load_average': load, 'augment': args.augment, 'rows': rows}, f, indent=1)
    return
  pipe = pipeline_rate(cfg, args.batch, args.batches)
  steps = step_rates(cfg, args)
  report = {**pipe, **steps, 'ratio': steps['step_alone_s'] / pipe['batch_s'],
            'fed_slowdown': steps['step_fed_s'] / steps['step_alone_s'], 'load_average': load,
            'dataset': args.dataset, 'augment': args.augment, 'batch': args.batch, 'width': args.width}
  print(f"{args.dataset} (augment {args.augment}), batch {args.batch}, {os.cpu_count()} CPUs, "
        f"load average {load} at start; {jax.devices()[0].device_kind}")
  print(f"pipeline alone: {pipe['batches_per_s']:.1f} batches/s = {pipe['images_per_s']:.0f} images/s "
        f"(first batch after {pipe['first_batch_s']:.1f} s)")
  print(f"GHL step (DeepHebb width {args.width}) alone: {1e3 * steps['step_alone_s']:.0f} ms = "
        f"{args.batch / steps['step_alone_s']:.1f} images/s")
  print(f"pipeline / step rate: {report['ratio']:.1f}x (goal >= 3)")
  print(f"step fed by the pipeline: {1e3 * steps['step_fed_s']:.0f} ms "
        f"({report['fed_slowdown']:.3f}x the step alone)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
