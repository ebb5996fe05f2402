"""The paper's headline CIFAR-10 run in one call: DeepHebb, GHL and BP, 100 epochs, on one GPU/TPU.

Both methods are the real configs (``experiments/configs/cifar10_deephebb_{ghl,bp}``: the authors'
two-group SGD, cosine over 100 epochs, batch 64, pixels in [-1, 1], no augmentation) with the
trainer's own train and eval steps (:mod:`ghl_jax.train.steps`). To keep the host out of the way,
the whole CIFAR-10 copy (``--data``: the ``train-*-of-*.npz`` / ``test.npz`` arrays) is put on the
device once, and one jitted call trains one epoch: a ``lax.scan`` over its steps, each step
gathering its 64 images by a per-epoch permutation::

    epoch e:  order = permutation(fold_in(seed, e), 50000)[: steps·64]
    step  s:  batch = images[order[s·64 : (s+1)·64]] / 127.5 − 1

GHL and BP take turns epoch by epoch, so at any stop both have trained equally long. After
``--budget-s`` seconds no new epoch starts (stop-and-report): both are evaluated on all 10,000 test
images at the epoch they reached, and the table gives epochs, test top-1, the GHL − BP gap
(paper after 100 epochs: 86.41 − 86.98 = −0.57 pt), step time and images/s::

    bash benchmarks/paper_run.sh                     # on a GPU/TPU host (about 8 minutes)
    python -m benchmarks.paper_run --tiny            # CPU smoke run: width 1/16, 2 short epochs

``--tiny`` runs the same code at width 1/16 on the first 1,024 training and 512 test images.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.configs import common, recipes  # noqa: E402
from ghl_jax.train import loop, methods, steps  # noqa: E402
from ghl_jax.train.data import offline  # noqa: E402

METHODS = ('ghl', 'bp')
PAPER_GAP = common.PAPER[('cifar10', 'deephebb', 'ghl')] - common.PAPER[('cifar10', 'deephebb', 'bp')]
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'cifar10')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=os.environ.get('CIFAR10_NPZ', DEFAULT_DATA),
                      help='folder with CIFAR-10 as train-*-of-*.npz and test.npz (keys image, label)')
  parser.add_argument('--epochs', type=int, default=0, help='epochs of the recipe (0: 100, tiny 2)')
  parser.add_argument('--budget-s', type=float, default=420.0,
                      help='start no new epoch after this many seconds, then evaluate and report')
  parser.add_argument('--eval-every', type=int, default=0, help='epochs between evaluations (0: at the end)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tiny', action='store_true', help='width 1/16, 1,024 training images (CPU smoke run)')
  parser.add_argument('--json', default='', help='also write the result to this JSON file')
  args = parser.parse_args(argv)
  args.epochs = args.epochs or (2 if args.tiny else 100)
  if args.epochs < 1 or args.budget_s <= 0 or args.eval_every < 0:
    parser.error('--epochs must be >= 1, --budget-s > 0 and --eval-every >= 0.')
  return args


def load(args) -> dict:
  """``{'train': (uint8 images, int32 labels), 'test': ...}`` on the default device."""
  try:
    splits = offline.read_cifar10_npz(args.data)
  except (ValueError, OSError) as error:
    raise SystemExit(f'error: {error} (set --data or CIFAR10_NPZ to the CIFAR-10 npz folder)') from None
  if args.tiny:
    splits = {'train': tuple(a[:1024] for a in splits['train']), 'test': tuple(a[:512] for a in splits['test'])}
  return {split: (jnp.asarray(images), jnp.asarray(labels, jnp.int32))
          for split, (images, labels) in splits.items()}


def _pixels(images):
  return images.astype(jnp.float32) / 127.5 - 1.0          # the paper's Normalize(0.5, 0.5)


class Run:
  """One method's model, state and jitted epoch."""

  def __init__(self, method: str, args, data: dict):
    config = recipes.cifar('cifar10', 'deephebb', method)
    config.compute_dtype, config.seed = args.dtype, args.seed
    if args.tiny:
      config.model.kwargs.width = 1 / 16
    self.method, self.config = method, config
    images, _ = data['train']
    self.per_epoch = images.shape[0] // config.batch_size
    total = self.per_epoch * args.epochs
    self.model = loop.build_model(config, num_classes=10)
    sample = _pixels(images[:1])
    variables = jax.jit(lambda: self.model.init(jax.random.key(args.seed), sample, train=False))()
    config.log_every_steps = self.per_epoch           # the step's statistics once per epoch
    tx, (phase,), _ = methods.phases(config, self.model, sample, total, 0)
    self.state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
                  'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(variables['params']),
                  'rng': jax.random.key(args.seed + 1)}
    self.step_fn = phase.step_fn                       # the trainer's step, unjitted
    self.epoch_fn = jax.jit(self._epoch(phase.step_fn, config.batch_size), donate_argnums=(0,))
    self.eval_fn = jax.jit(self._evaluate(steps.make_eval_step(self.model)))
    self.epochs, self.seconds, self.compile_s, self.loss = 0, [], 0.0, float('nan')
    self.curve, self.last_top1 = [], float('nan')      # (epoch, test top-1) at each evaluation

  def _epoch(self, train_step, batch_size: int):
    per_epoch = self.per_epoch

    def epoch(state, images, labels, key):
      order = jax.random.permutation(key, images.shape[0])[:per_epoch * batch_size]

      def body(state, idx):
        state, metrics = train_step(state, {'image': _pixels(images[idx]), 'label': labels[idx]})
        return state, metrics['loss']
      state, losses = jax.lax.scan(body, state, order.reshape(per_epoch, batch_size))
      return state, jnp.mean(losses)
    return epoch

  @staticmethod
  def _evaluate(eval_step, chunk: int = 500):
    """Test top-1 over every image: chunks of ``chunk``, the last one padded and masked."""
    def evaluate(state, images, labels):
      size = min(chunk, images.shape[0])
      pad = -images.shape[0] % size
      mask = jnp.arange(images.shape[0] + pad) < images.shape[0]
      images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
      labels = jnp.pad(labels, (0, pad))
      xs = (images.reshape(-1, size, *images.shape[1:]), labels.reshape(-1, size), mask.reshape(-1, size))

      def one(x):
        return eval_step(state, {'image': _pixels(x[0]), 'label': x[1], 'mask': x[2].astype(jnp.float32)})
      sums = jax.tree.map(jnp.sum, jax.lax.map(one, xs))
      return sums['top1'] / sums['count']
    return evaluate

  def train_epoch(self, data: dict, seed: int) -> None:
    images, labels = data['train']
    key = jax.random.fold_in(jax.random.key(seed), self.epochs)
    start = time.perf_counter()
    if self.epochs == 0:
      compiled = self.epoch_fn.lower(self.state, images, labels, key).compile()
      self.compile_s = time.perf_counter() - start
      self.epoch_fn, start = compiled, time.perf_counter()
    self.state, loss = self.epoch_fn(self.state, images, labels, key)
    self.loss = float(loss)                         # also waits for the epoch
    self.seconds.append(time.perf_counter() - start)
    self.epochs += 1

  def top1(self, data: dict) -> float:
    return 100 * float(self.eval_fn(self.state, *data['test']))


def report(runs: dict, args, wall: float, stopped: bool) -> dict:
  device = jax.devices()[0]
  rows = []
  for run in runs.values():
    step_s = statistics.median(run.seconds) / run.per_epoch if run.seconds else float('nan')
    rows.append({'method': run.method, 'epochs': run.epochs, 'steps': run.epochs * run.per_epoch,
                 'top1': run.last_top1, 'loss': run.loss, 'step_ms': 1e3 * step_s,
                 'images_per_s': run.config.batch_size / step_s, 'compile_s': run.compile_s,
                 'curve': run.curve})
  by = {r['method']: r for r in rows}
  return {'device': f'{device.platform} {device.device_kind}', 'dtype': args.dtype, 'seed': args.seed,
          'epochs_planned': args.epochs, 'stopped_at_budget': stopped, 'wall_s': wall,
          'gap': by['ghl']['top1'] - by['bp']['top1'], 'paper_gap': PAPER_GAP, 'rows': rows}


def table(result: dict) -> str:
  lines = [f"CIFAR-10 DeepHebb, paper recipe, {result['dtype']}, {result['device']}; "
           f"{'stopped at the wall-clock budget' if result['stopped_at_budget'] else 'finished'} "
           f"after {result['wall_s']:.0f} s",
           '', '| method | epochs | steps | test top-1 (%) | step (ms) | images/s | compile (s) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in result['rows']:
    lines.append(f"| {r['method'].upper()} | {r['epochs']} / {result['epochs_planned']} | {r['steps']} | "
                 f"{r['top1']:.2f} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | {r['compile_s']:.1f} |")
  lines.append(f"\nGHL − BP: {result['gap']:+.2f} pt (paper after 100 epochs: {result['paper_gap']:+.2f} pt)")
  return '\n'.join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if jax.default_backend() == 'cpu' and not args.tiny:
    raise SystemExit('error: JAX sees no GPU/TPU (backend cpu): run on an accelerator host, or pass '
                     '--tiny for the CPU smoke run.')
  start = time.perf_counter()
  data = load(args)
  runs = {method: Run(method, args, data) for method in METHODS}
  stopped = False
  for epoch in range(args.epochs):
    if epoch and time.perf_counter() - start > args.budget_s:     # at least one epoch
      stopped = True
      break
    for run in runs.values():
      run.train_epoch(data, args.seed)
    done = epoch + 1
    evaluate = done == args.epochs or (args.eval_every and done % args.eval_every == 0)
    line = [f'epoch {done}/{args.epochs}']
    for run in runs.values():
      if evaluate:
        run.last_top1 = run.top1(data)
        run.curve.append((done, run.last_top1))
      line.append(f'{run.method} loss {run.loss:.3f} {run.seconds[-1]:.1f} s'
                  + (f' top-1 {run.last_top1:.2f}' if evaluate else ''))
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (args.epochs - done)
    print(' | '.join(line) + f' | {elapsed:.0f} s, ETA {eta:.0f} s', flush=True)
  for run in runs.values():
    if not run.curve or run.curve[-1][0] != run.epochs:
      run.last_top1 = run.top1(data)
      run.curve.append((run.epochs, run.last_top1))
  result = report(runs, args, time.perf_counter() - start, stopped)
  print(table(result), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
