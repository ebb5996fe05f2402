"""Compile time of the trainer's step against the number of gradient-accumulation micro-batches.

The step accumulates with an unrolled loop on the CPU kernels (``conv_impl='gemm'``: XLA:CPU runs
convolutions inside loop bodies several times slower) and with a ``lax.scan`` elsewhere
(``ghl_jax.accel.unrolled_loops``); this times ``lower + compile`` of both forms on this machine::

    python -m benchmarks.accumulation                       # DeepHebb width 1/4, batch 64, A = 1, 4, 16
    python -m benchmarks.accumulation --micro 1,4,16 --width 0.25 --batch 64
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import ghl_jax
from ghl_jax import models
from ghl_jax.train import steps

IMPLS = {'gemm': 'unrolled (CPU kernels)', 'xla': 'lax.scan (XLA kernels)'}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--micro', default='1,4,16', help='comma-separated micro-batch counts')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args(argv)
  args.counts = [int(a) for a in args.micro.split(',')]
  if any(a < 1 or args.batch % a for a in args.counts):
    parser.error(f'every micro-batch count must be >= 1 and divide --batch={args.batch}.')
  return args


def compile_seconds(model, impl: str, accum: int, batch: int) -> float:
  """Seconds to lower and compile one GHL train step with ``accum`` micro-batches."""
  rule = ghl_jax.Rule('softmax_oja', t_inv={'conv2': 0.65, 'conv3': 0.25})
  tx = ghl_jax.optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=100, rule=rule)
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  state = jax.eval_shape(lambda v: {'step': jnp.zeros((), jnp.int32), 'params': v['params'],
                                    'batch_stats': v['batch_stats'], 'opt_state': tx.init(v['params']),
                                    'rng': jax.random.key(1)}, variables)
  step = jax.jit(steps.make_train_step(model, tx, rule=rule, accum_steps=accum, conv_impl=impl))
  start = time.perf_counter()
  step.lower(state, {'image': images, 'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}).compile()
  return time.perf_counter() - start


def main(argv=None):
  args = parse_args(argv)
  model = models.DeepHebb(width=args.width)
  rows = {impl: [compile_seconds(model, impl, a, args.batch) for a in args.counts] for impl in IMPLS}
  print(f'DeepHebb width {args.width}, batch {args.batch}, GHL step, jax {jax.__version__}, {jax.default_backend()}')
  print('| accumulation | ' + ' | '.join(f'A = {a} (s)' for a in args.counts) + ' |')
  print('|---|' + '---:|' * len(args.counts))
  for impl, seconds in rows.items():
    print(f'| {IMPLS[impl]} | ' + ' | '.join(f'{s:.1f}' for s in seconds) + ' |')
  return rows


if __name__ == '__main__':
  main()
