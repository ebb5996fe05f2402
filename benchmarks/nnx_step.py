"""GHL step time of an NNX CNN on the CPU kernels vs XLA's convolutions (``ghl_jax.nnx``).

The NNX model has DeepHebb's convolutions (5×5 → 96, 3×3 → 384, 3×3 → 1536 at ``--width`` 1, each
followed by a max pool, then a linear head), trained by ``nnx.Optimizer`` with ``ghl()`` on every
conv kernel; the step is ``nnx.jit``-ed and the two ``conv_impl`` variants take turns::

    python -m benchmarks.nnx_step                     # batch 64, width 1, 10 rounds
    python -m benchmarks.nnx_step --batch 16 --width 0.5
"""
from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx
import jax
import optax

import ghl_jax

IMPLS = ('gemm', 'xla')


class NnxDeepHebbConvs(nnx.Module):
  """DeepHebb's three convolutions (zero padding ``k // 2``), max pools and a linear head."""

  def __init__(self, width: float, rngs: nnx.Rngs):
    sizes = [3] + [max(1, round(width * c)) for c in (96, 384, 1536)]
    self.convs = nnx.List([nnx.Conv(a, b, (k, k), padding=k // 2, use_bias=False, rngs=rngs)
                           for a, b, k in zip(sizes, sizes[1:], (5, 3, 3))])
    self.head = nnx.Linear(sizes[-1], 10, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), (2, 2))
    return self.head(x.mean(axis=(1, 2)))


def make_step(impl: str):
  rule = ghl_jax.Rule('softmax_oja', t_inv=0.65, layers=r'convs')

  @nnx.jit
  def step(model, optimizer, images, labels):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()
    loss, grads, hebb = ghl_jax.nnx.value_and_grad(loss_fn, rule, conv_impl=impl)(model)
    optimizer.update(model, grads, hebb=hebb)
    return loss
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--steps', type=int, default=10, help='timed rounds (one step per variant)')
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or not args.width > 0:
    parser.error('--batch and --steps must be >= 1 and --width > 0.')
  ghl_jax.accel.prepare_host()
  images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  labels = jax.numpy.arange(args.batch) % 10
  runs = {}
  for impl in IMPLS:
    model = NnxDeepHebbConvs(args.width, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(ghl_jax.ghl(), optax.sgd(1e-2)), wrt=nnx.Param)
    step = make_step(impl)
    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, images, labels))
    runs[impl] = {'args': (model, optimizer, images, labels), 'step': step,
                  'first_s': time.perf_counter() - start, 'times': []}
  for _ in range(args.steps):
    for run in runs.values():
      start = time.perf_counter()
      jax.block_until_ready(run['step'](*run['args']))
      run['times'].append(time.perf_counter() - start)
  print(f'NNX DeepHebb convs, width {args.width}, batch {args.batch}, {args.steps} rounds, '
        f'{jax.devices()[0].device_kind}\n\n| conv_impl | median step (ms) | images/s | first call (s) |'
        '\n|---|---:|---:|---:|')
  medians = {impl: statistics.median(run['times']) for impl, run in runs.items()}
  for impl, run in runs.items():
    print(f"| {impl} | {1e3 * medians[impl]:.0f} | {args.batch / medians[impl]:.0f} | {run['first_s']:.1f} |")
  print(f"\nxla / gemm: {medians['xla'] / medians['gemm']:.2f}")
  return medians


if __name__ == '__main__':
  main()
