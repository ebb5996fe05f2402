"""Depth scaling of the GHL train step on CIFAR ResNets (ResNet-20 … ResNet-1202).

For each depth: compile time of the jitted step (lower + compile), median step time, step time
per residual block, and XLA's memory analysis of the compiled step (temp + argument buffers)
at the timing batch and at a larger batch (compiled only, never run). The identical blocks of
each stage run under nn.scan, so compile time should stay flat and time per block constant.

    python benchmarks/depth_scaling.py --depths=20,56,110,1202 --batch=8 --memory_batch=32

Prints a markdown table and the three goals: ResNet-1202 compile ≤ 2× ResNet-110's, the marginal
time per added block (Δ step / Δ blocks between consecutive depths) within 25 % from one pair of
depths to the next, ResNet-1202 at the memory batch within 24 GiB.

The step is the public fused path with its defaults, so on CPU the convolutions inside the scan
bodies run on the GEMM kernels (:mod:`ghl_jax.accel`) with their Hebbian terms formed in the forward
pass; XLA's own backward convolutions are several times slower in loop bodies there
(jax-ml/jax#12868). At the memory batch the step is also run (``--memory_steps`` timed steps) for
its time and the process's peak RSS.
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
flags.DEFINE_integer('steps', 15, 'Timed steps per depth (after two warm-up steps).')
flags.DEFINE_integer('memory_steps', 2, 'Timed steps at the memory batch (0: compile only).')
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


def _timed(compiled, state, images, labels) -> tuple:
  """``((wall s, process CPU s), state)`` of one step. CPU seconds do not count the time a shared
  machine's hypervisor takes the cores away, so they stay steady where wall times do not."""
  start, cpu = time.perf_counter(), time.process_time()
  state = compiled(*state[:3], images, labels)
  jax.block_until_ready(state)
  return (time.perf_counter() - start, time.process_time() - cpu), state


class Depth:
  """One depth's compiled step at the timing batch, its state and its row of the table."""

  def __init__(self, depth: int):
    model = models.CifarResNet(depth=depth, remat=FLAGS.remat, shortcut=FLAGS.shortcut)
    rule = ghl_jax.Rule('softmax_oja')
    tx = ghl_jax.optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=10_000, rule=rule)
    self.key = jax.random.key(0, impl='rbg')
    self.images = jax.random.normal(self.key, (FLAGS.batch, 32, 32, 3))
    self.labels = jnp.arange(FLAGS.batch) % 10
    variables = jax.jit(lambda: model.init(self.key, self.images, train=False))()
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    self.step = make_step(model, tx, rule)
    self.shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, batch_stats, opt_state))
    start = time.perf_counter()
    self.compiled = self.step.lower(params, batch_stats, opt_state, self.images, self.labels).compile()
    self.row = {'depth': depth, 'blocks': 3 * blocks_per_stage(depth),
                'compile_s': time.perf_counter() - start, 'bytes': xla_bytes(self.compiled)}
    self.state = self.compiled(params, batch_stats, opt_state, self.images, self.labels)   # warm-up
    self.times = []

  def run(self) -> None:
    seconds, self.state = _timed(self.compiled, self.state, self.images, self.labels)
    self.times.append(seconds)

  def finish(self) -> dict:
    """The row, with the memory batch compiled (and run ``--memory_steps`` times)."""
    row = self.row
    row['step_s'] = statistics.median(t for t, _ in self.times)
    row['cpu_s'] = statistics.median(c for _, c in self.times)
    row['block_ms'] = 1e3 * row['step_s'] / row['blocks']
    if FLAGS.memory_batch:
      big = self.step.lower(*self.shapes, *batch_specs(FLAGS.memory_batch)).compile()
      row['big_bytes'] = xla_bytes(big)
      if FLAGS.memory_steps:
        images = jax.random.normal(self.key, (FLAGS.memory_batch, 32, 32, 3))
        labels = jnp.arange(FLAGS.memory_batch) % 10
        _, state = _timed(big, self.state, images, labels)            # warm-up
        times = []
        for _ in range(FLAGS.memory_steps):
          (seconds, _), state = _timed(big, state, images, labels)
          times.append(seconds)
        row['big_step_s'] = statistics.median(times)
        row['rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    self.compiled = self.state = None                                   # free before the next depth
    return row


def marginals(rows, key: str = 'step_s') -> list:
  """``(depth, ms per added block)`` from each depth to the next: Δ step time / Δ blocks (the stem,
  the head and the optimizer's fixed cost drop out); ``key='cpu_s'``: in process CPU time."""
  return [(b['depth'], 1e3 * (b[key] - a[key]) / (b['blocks'] - a['blocks']))
          for a, b in zip(rows, rows[1:])]


def largest_change(values) -> float:
  """The largest relative change between consecutive marginals."""
  return max(max(a, b) / min(a, b) - 1 for a, b in zip(values, values[1:]))


def table(rows) -> str:
  big = FLAGS.memory_batch
  marginal, marginal_cpu = dict(marginals(rows)), dict(marginals(rows, 'cpu_s'))
  lines = [f'| model | blocks | compile (s) | step @ batch {FLAGS.batch} (ms) | per block (ms) '
           f'| marginal per block (ms) | CPU s per step | marginal CPU per block (ms) '
           f'| XLA temp+args @ {FLAGS.batch} (MiB) |'
           + (f' XLA temp+args @ {big} (GiB) | step @ {big} (ms) | process peak RSS so far (GiB) |' if big else ''),
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|---:|---:|' if big else '')]
  for r in rows:
    added = f"{marginal[r['depth']]:.2f}" if r['depth'] in marginal else '–'
    added_cpu = f"{marginal_cpu[r['depth']]:.2f}" if r['depth'] in marginal_cpu else '–'
    line = (f"| ResNet-{r['depth']} | {r['blocks']} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} "
            f"| {r['block_ms']:.2f} | {added} | {r['cpu_s']:.3f} | {added_cpu} | {r['bytes'] / MIB:.0f} |")
    if big:
      timed = f" {1e3 * r['big_step_s']:.0f} | {r['rss_gib']:.2f} |" if 'big_step_s' in r else ' – | – |'
      line += f" {r['big_bytes'] / GIB:.2f} |" + timed
    lines.append(line)
  return '\n'.join(lines)


def goals(rows) -> list[str]:
  verdict = lambda met: 'ok' if met else 'MISSED'
  by_depth = {r['depth']: r for r in rows}
  out = []
  if 110 in by_depth and 1202 in by_depth:
    ratio = by_depth[1202]['compile_s'] / by_depth[110]['compile_s']
    out.append(f'compile ResNet-1202 / ResNet-110 = {ratio:.2f} (goal <= 2): {verdict(ratio <= 2)}')
  for key, label in (('step_s', 'wall'), ('cpu_s', 'CPU')):
    steps = [m for _, m in marginals(rows, key)]
    if len(steps) > 1:
      worst = largest_change(steps)
      out.append(f'marginal {label} time per block between consecutive depths: '
                 f'{", ".join(f"{m:.2f}" for m in steps)} ms, largest change {100 * worst:.0f}% '
                 f'(goal <= 25%): {verdict(worst <= 0.25)}')
  if FLAGS.memory_batch and 1202 in by_depth:
    gib = by_depth[1202]['big_bytes'] / GIB
    out.append(f'ResNet-1202 XLA temp+args @ batch {FLAGS.memory_batch}: {gib:.2f} GiB (goal <= 24): '
               f'{verdict(gib <= 24)}')
  return out


def main(argv):
  del argv
  ghl_jax.accel.prepare_host()        # as training does on CPU: freed step buffers are kept, not re-faulted
  depths = []
  for depth in map(int, FLAGS.depths):
    depths.append(Depth(depth))
    print(f"ResNet-{depth}: compiled in {depths[-1].row['compile_s']:.1f} s", flush=True)
  rows = []
  for d in depths:        # depth after depth: round-robin put a 3 s ResNet-1202 step before each 30 ms
    d.run()             # ResNet-20 one and slowed that one down 2-3×; one more warm-up step each
    d.times.clear()
    for _ in range(FLAGS.steps):
      d.run()
    rows.append(d.finish())
  print(f'\nGHL train step (paper_sgd), {jax.devices()[0].platform}, remat={FLAGS.remat}, '
        f'shortcut {FLAGS.shortcut}\n')
  print(table(rows))
  print()
  for line in goals(rows):
    print('- ' + line)
  print(f'- process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')


if __name__ == '__main__':
  app.run(main)
