"""Train-step time of GHL vs end-to-end backprop on DeepHebb, in one process.

Both modes run the project's jitted, state-donating train step (``ghl_jax.steps``) with the
paper's two-group SGD; GHL adds the taps, the raw Hebbian terms and ``sign(G) ⊙ |Ĥ|``. For
each mode it prints the median step time over ``--steps`` timed steps (after ``--warmup``),
images/s, the FLOPs of one step from XLA's cost analysis, and the achieved FLOP/s as a share
of a measured float32 matmul peak (median time of a large ``jnp.dot`` in the same process)::

    python -m benchmarks.step_time                       # full width, batch 64, 20 steps
    python -m benchmarks.step_time --width 0.25 --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from ghl_jax import models, optim, steps

T_INV = {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}
KERNELS = ('conv1/kernel', 'conv2/kernel', 'conv3/kernel')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=float, default=1.0, help='DeepHebb width multiplier')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20, help='timed steps per mode')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compilation')
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--matmul-size', type=int, default=0,
                      help='side of the square matmul that measures peak '
                           '(0: 8192 on GPU/TPU, 1024 on CPU)')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch < 1 or not args.width > 0:
    parser.error('--steps and --batch must be >= 1, --warmup >= 0 and --width > 0.')
  return args


def block(tree):
  return jax.tree.map(lambda a: a.block_until_ready(), tree)


def flops_of(compiled) -> float:
  """FLOPs of one call from XLA's cost analysis (nan where the backend gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def matmul_peak(size: int, repeats: int = 10) -> float:
  """Measured float32 FLOP/s of a ``size × size`` matmul: ``2·size³ / median time``."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  block(dot(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(dot(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / statistics.median(times)


def make_state(model, tx, batch):
  variables = model.init(jax.random.key(0), batch['image'][:1], train=False)
  params = variables['params']
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(params),
          'rng': jax.random.key(1)}


def time_mode(model, batch, *, use_ghl: bool, args) -> dict:
  """Median step time, images/s and FLOPs of one mode's donated train step."""
  total = args.warmup + args.steps + 1
  tx = optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=total, kernels=KERNELS,
                       use_ghl=use_ghl, t_inv=T_INV)
  ghl_kwargs = {'rule': 'softmax_oja', 't_inv': T_INV, 'layers': KERNELS} if use_ghl else None
  step_fn = jax.jit(steps.make_train_step(model, tx, ghl_kwargs=ghl_kwargs), donate_argnums=(0,))
  state = make_state(model, tx, batch)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  block((state, metrics) if args.warmup else state)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    block((state, metrics))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'mode': 'GHL' if use_ghl else 'BP', 'median_s': median, 'images_per_s': args.batch / median,
          'flops': flops_of(compiled), 'compile_s': compile_s, 'loss': float(metrics['loss'])}


def table(rows, peak: float) -> str:
  lines = ['| mode | median step (ms) | images/s | GFLOP/step | achieved TFLOP/s '
           '| % of matmul peak | compile (s) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    achieved = r['flops'] / r['median_s']
    lines.append(f"| {r['mode']} | {1e3 * r['median_s']:.2f} | {r['images_per_s']:.0f} | "
                 f"{r['flops'] / 1e9:.2f} | {achieved / 1e12:.3f} | {100 * achieved / peak:.1f} | "
                 f"{r['compile_s']:.1f} |")
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  device = jax.devices()[0]
  size = args.matmul_size or (1024 if device.platform == 'cpu' else 8192)
  model = models.DeepHebb(num_classes=10, width=args.width)
  images = jax.random.normal(jax.random.key(2), (args.batch, args.image_size, args.image_size, 3))
  batch = {'image': images, 'label': jnp.arange(args.batch) % 10}
  rows = [time_mode(model, batch, use_ghl=ghl, args=args) for ghl in (True, False)]
  peak = matmul_peak(size)
  print(f'DeepHebb width {args.width}, batch {args.batch}, {args.image_size}x{args.image_size}, '
        f'{args.steps} timed steps after {args.warmup} warm-up; {device.device_kind} '
        f'({jax.device_count()} device(s), step on one), jax {jax.__version__}')
  print(f'float32 matmul peak ({size}x{size}, default precision): {peak / 1e12:.3f} TFLOP/s\n')
  print(table(rows, peak))
  ghl, bp = rows
  print(f'\nGHL / BP step time: {ghl["median_s"] / bp["median_s"]:.3f}  '
        f'(FLOPs ratio {ghl["flops"] / bp["flops"]:.3f})')


if __name__ == '__main__':
  main()
