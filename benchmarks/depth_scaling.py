"""Depth scaling of the GHL train step on CIFAR ResNets (ResNet-20 … ResNet-1202).

For each depth: compile time of the jitted step (lower + compile), median step time, step time
per residual block, and XLA's memory analysis of the compiled step (temp + argument buffers)
at the timing batch and at a larger batch (compiled only, never run). The identical blocks of
each stage run under nn.scan, so compile time should stay flat and time per block constant.

    python benchmarks/depth_scaling.py --depths=20,56,110,1202 --batch=8 --memory_batch=32

Prints a markdown table and the three goals: ResNet-1202 compile ≤ 2× ResNet-110's, time per
block within 25 % across depths, ResNet-1202 at the memory batch within 24 GiB.

On XLA:CPU the backward convs inside a scan body run several times slower than the same convs
unrolled (jax-ml/jax#12868: the transposed kernel keeps a non-canonical layout in loop bodies),
so the unscanned first block of each stage is cheaper there and shallow nets, where those are a
larger share of the blocks, show a lower time per block.
"""
from __future__ import annotations

import resource
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import optax

import ghl_jax
from ghl_jax import models
from ghl_jax.models.cifar_resnet import blocks_per_stage

FLAGS = flags.FLAGS
flags.DEFINE_list('depths', ['20', '56', '110', '1202'], 'CIFAR ResNet depths (6n+2).')
flags.DEFINE_integer('batch', 8, 'Batch size of the timed steps.')
flags.DEFINE_integer('memory_batch', 32, 'Batch size of the memory-only compile (0: skip).')
flags.DEFINE_integer('steps', 3, 'Timed steps per depth (after one warm-up step).')
flags.DEFINE_boolean('remat', False, 'Recompute block activations in the backward pass.')
flags.DEFINE_string('shortcut', 'A', 'CIFAR ResNet shortcut option, A or B.')

GIB = 2**30
MIB = 2**20


def make_step(model, tx, rule):
  """One GHL train step through the public fused path: ``ghl_jax.value_and_grad``, then
  ``tx.update(..., hebb=)``, apply."""
  def loss_fn(params, batch_stats, images, labels):
    logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state['batch_stats']
  grad_fn = ghl_jax.value_and_grad(loss_fn, rule, has_aux=True)

  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads, hebb = grad_fn(params, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params, hebb=hebb)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def batch_specs(batch: int):
  return (jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))


def xla_bytes(compiled) -> int:
  """Peak device bytes XLA plans for the step: temporaries + arguments."""
  stats = compiled.memory_analysis()
  return stats.temp_size_in_bytes + stats.argument_size_in_bytes


def measure(depth: int) -> dict:
  model = models.CifarResNet(depth=depth, remat=FLAGS.remat, shortcut=FLAGS.shortcut)
  rule = ghl_jax.Rule('softmax_oja')
  tx = ghl_jax.optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=10_000, rule=rule)
  key = jax.random.key(0, impl='rbg')
  images = jax.random.normal(key, (FLAGS.batch, 32, 32, 3))
  labels = jnp.arange(FLAGS.batch) % 10
  variables = jax.jit(lambda: model.init(key, images, train=False))()
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  step = make_step(model, tx, rule)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, batch_stats, opt_state))

  start = time.perf_counter()
  compiled = step.lower(params, batch_stats, opt_state, images, labels).compile()
  compile_s = time.perf_counter() - start
  row = {'depth': depth, 'blocks': 3 * blocks_per_stage(depth), 'compile_s': compile_s,
         'bytes': xla_bytes(compiled)}

  state = compiled(params, batch_stats, opt_state, images, labels)   # warm-up
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state = compiled(*state[:3], images, labels)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  row['step_s'] = statistics.median(times)
  row['block_ms'] = 1e3 * row['step_s'] / row['blocks']

  if FLAGS.memory_batch:
    row['big_bytes'] = xla_bytes(step.lower(*shapes, *batch_specs(FLAGS.memory_batch)).compile())
  return row


def table(rows) -> str:
  big = FLAGS.memory_batch
  lines = [f'| model | blocks | compile (s) | step @ batch {FLAGS.batch} (ms) | per block (ms) '
           f'| XLA temp+args @ {FLAGS.batch} (MiB) |' + (f' XLA temp+args @ {big} (GiB) |' if big else ''),
           '|---|---:|---:|---:|---:|---:|' + ('---:|' if big else '')]
  for r in rows:
    line = (f"| ResNet-{r['depth']} | {r['blocks']} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} "
            f"| {r['block_ms']:.2f} | {r['bytes'] / MIB:.0f} |")
    lines.append(line + (f" {r['big_bytes'] / GIB:.2f} |" if big else ''))
  return '\n'.join(lines)


def goals(rows) -> list[str]:
  verdict = lambda met: 'ok' if met else 'MISSED'
  by_depth = {r['depth']: r for r in rows}
  out = []
  if 110 in by_depth and 1202 in by_depth:
    ratio = by_depth[1202]['compile_s'] / by_depth[110]['compile_s']
    out.append(f'compile ResNet-1202 / ResNet-110 = {ratio:.2f} (goal <= 2): {verdict(ratio <= 2)}')
  per_block = [r['block_ms'] for r in rows]
  spread = max(per_block) / min(per_block) - 1
  out.append(f'per-block step time spread = {100 * spread:.0f}% (goal <= 25%): {verdict(spread <= 0.25)}')
  if FLAGS.memory_batch and 1202 in by_depth:
    gib = by_depth[1202]['big_bytes'] / GIB
    out.append(f'ResNet-1202 XLA temp+args @ batch {FLAGS.memory_batch}: {gib:.2f} GiB (goal <= 24): '
               f'{verdict(gib <= 24)}')
  return out


def main(argv):
  del argv
  rows = []
  for depth in map(int, FLAGS.depths):
    rows.append(measure(depth))
    print(f"ResNet-{depth}: done ({rows[-1]['compile_s']:.1f} s compile)", flush=True)
  print(f'\nGHL train step (paper_sgd), {jax.devices()[0].platform}, remat={FLAGS.remat}, '
        f'shortcut {FLAGS.shortcut}\n')
  print(table(rows))
  print()
  for line in goals(rows):
    print('- ' + line)
  print(f'- process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')


if __name__ == '__main__':
  app.run(main)
