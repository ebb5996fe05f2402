"""Train-step time of GHL vs end-to-end backprop, interleaved in one process.

Every variant runs the project's jitted train step (:func:`ghl_jax.train.steps.make_train_step`,
state donated) with the paper's two-group SGD; GHL adds the Hebbian terms and
``sign(G) ⊙ |Ĥ|``. The variants take turns step by step (round-robin), and every round also
times a sustained float32 matmul chain, so that machine load hits all of them alike. Per
variant it prints the median step time over ``--steps`` rounds (after ``--warmup``), images/s,
the FLOPs of one step and the achieved FLOP/s as a share of the median matmul peak::

    model FLOPs:  forward F = Σ_layers 2·|u|·fan_in      (every nn.Conv / nn.Dense call)
                  BP  = 3F − F_first                      (no input gradient for the first layer)
                  GHL = BP + Σ_governed F_layer           (one Σ y ⊗ x per governed kernel)

XLA's cost analysis of the compiled step is printed beside them. On CPU it also prints the
cores a step kept busy (process CPU time / wall time) and the cores other processes used
meanwhile (from /proc/stat), since shared machines make wall times noisy::

    python -m benchmarks.step_time                          # DeepHebb, batch 64: GHL vs BP
    python -m benchmarks.step_time --variants=changes       # every kept change, before/after
    python -m benchmarks.step_time --model resnet20 --width 1 --batch 32 --steps 5

Variant labels: 'GHL'/'BP' is the step as trained (``conv_impl='auto'``); ``xla``: XLA's own
convolutions (``conv_impl='xla'``); ``taps``: every Hebbian term from taps after the gradient
(the v1 loop of :func:`benchmarks.loops.taps_step`); ``user``: the README's own loop on the public
API (:func:`benchmarks.loops.user_step`); ``v1``: the v1 user loop as a user wrote it (taps, plain
``jax.value_and_grad``, XLA's convolutions); ``flaxpool``: DeepHebb's max pools as ``nn.max_pool``; ``nodonate``:
the state is not donated. ``--malloc=default`` runs with glibc's allocator defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

import ghl_jax
from benchmarks import loops
from ghl_jax import adapters
from ghl_jax import models, optim, transform
from ghl_jax.kernels import host_memory
from ghl_jax.train import steps, summary
from ghl_jax.models import deephebb
from ghl_jax.tap import tap

DEEPHEBB_T_INV = {'conv1': 1.0, 'conv2': 0.65, 'conv3': 0.25}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of running the train step."""
  label: str
  ghl: bool
  conv_impl: str = 'auto'
  loop: str = 'trainer'           # 'trainer' (its step), 'user' (README's loop), 'taps' (v1 loop)
  donate: bool = True             # the state buffers are donated to the step
  flax_pool: bool = False         # DeepHebb's max pools as nn.max_pool (select-and-scatter grad)
  dtype: str = 'float32'          # the model's compute dtype (params, optimizer, Hebbian sums: float32)


VARIANTS = {v.label: v for v in (
    Variant('GHL', True), Variant('BP', False),
    Variant('GHL xla+flaxpool+taps', True, 'xla', loop='taps', flax_pool=True),
    Variant('BP xla+flaxpool+taps', False, 'xla', flax_pool=True),
    Variant('GHL xla+taps', True, 'xla', loop='taps'), Variant('BP xla+taps', False, 'xla'),
    Variant('GHL xla', True, 'xla'), Variant('BP xla', False, 'xla'),
    Variant('GHL taps', True, loop='taps'),
    Variant('user GHL', True, loop='user'), Variant('user BP', False, loop='user'),
    Variant('user GHL v1', True, 'xla', loop='taps'), Variant('user BP v1', False, 'xla', loop='taps'),
    Variant('GHL nodonate', True, donate=False), Variant('BP nodonate', False, donate=False),
    Variant('GHL bf16', True, dtype='bfloat16'), Variant('BP bf16', False, dtype='bfloat16'),
    Variant('user GHL bf16', True, loop='user', dtype='bfloat16'),
    Variant('user BP bf16', False, loop='user', dtype='bfloat16'),
    Variant('GHL bf16 xla', True, 'xla', dtype='bfloat16'),
)}
GROUPS = {
    'ghl,bp': ('GHL', 'BP'),
    'user': ('user GHL', 'user BP', 'GHL', 'BP', 'user GHL v1', 'user BP v1'),
    'bf16': ('user GHL bf16', 'user BP bf16', 'user GHL', 'user BP', 'GHL bf16', 'BP bf16', 'GHL', 'BP'),
    'changes': ('GHL xla+flaxpool+taps', 'BP xla+flaxpool+taps', 'GHL xla+taps', 'BP xla+taps',
                'GHL xla', 'GHL taps', 'GHL', 'BP', 'GHL nodonate', 'BP nodonate'),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='deephebb', help='a registered model name')
  parser.add_argument('--width', type=float, default=1.0, help='width multiplier (models that have one)')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3, help='image channels (1: Fashion-MNIST)')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--steps', type=int, default=10, help='timed rounds (one step per variant each)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed rounds after compilation')
  parser.add_argument('--variants', default='ghl,bp',
                      help=f'a group ({", ".join(GROUPS)}) or comma-separated labels of {sorted(VARIANTS)}')
  parser.add_argument('--matmul-size', type=int, default=0,
                      help='side of the peak matmul (0: 2048 on CPU, 8192 on GPU/TPU)')
  parser.add_argument('--malloc', choices=('keep', 'default'), default='keep',
                      help="'keep': host_memory.keep_freed_memory() as training does on CPU; "
                           "'default': glibc's defaults (every step re-faults its buffers)")
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  if min(args.steps, args.batch, args.channels) < 1 or args.warmup < 0 or not args.width > 0:
    parser.error('--steps, --batch and --channels must be >= 1, --warmup >= 0 and --width > 0.')
  labels = GROUPS.get(args.variants) or tuple(v.strip() for v in args.variants.split(','))
  unknown = [v for v in labels if v not in VARIANTS]
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {sorted(VARIANTS)} or a group {sorted(GROUPS)}.')
  args.variant_list = [VARIANTS[v] for v in labels]
  return args


def block(tree):
  return jax.tree.map(lambda a: a.block_until_ready(), tree)


# ------------------------------------------------------------------------------------------------
# Counting: FLOPs, matmul peak, CPU use.

def xla_flops(compiled) -> float:
  """FLOPs of one call from XLA's cost analysis (nan where the backend gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def layer_flops(taps) -> dict:
  """``{kernel_path: forward FLOPs}`` (``2·|u|·fan_in`` summed over calls, :mod:`ghl_jax.train.summary`)."""
  return {transform.kernel_path(path): flops for path, flops in summary.layer_flops(taps).items()}


def model_flops(model, batch, ghl_layers=None) -> dict:
  """Model FLOPs of one forward pass, a backprop step and a GHL step (see the module doc)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch['image'][:1], train=False))
  calls = []

  def record(next_fun, args, kwargs, context):
    layer = adapters.read(context.module) if context.method_name == '__call__' else None
    if getattr(layer, 'is_conv', False) or getattr(layer, 'is_dense', False):
      calls.append(transform.kernel_path(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, taps = jax.eval_shape(lambda v, x: tap(model.apply)(v, x, train=True, mutable=['batch_stats'],
                                                           rngs={'dropout': jax.random.key(0)}),
                             variables, batch['image'])
  per_layer = layer_flops(taps)
  forward = sum(per_layer.values())
  backprop = 3 * forward - per_layer[calls[0]]
  governed = transform.selected_layers(taps, ghl_layers)
  return {'forward': forward, 'BP': backprop, 'GHL': backprop + sum(per_layer[p] for p in governed)}


def matmul_chain(size: int, length: int, dtype=jnp.float32):
  """``(fn, flops)``: a jitted chain of ``length`` dependent ``size × size`` products."""
  def chain(a, b):
    for _ in range(length):
      a = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)
    return a
  return jax.jit(chain), 2.0 * length * size ** 3


def matmul_operands(size: int, dtype=jnp.float32):
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = (jax.random.normal(jax.random.key(1), (size, size)) / math.sqrt(size)).astype(dtype)
  return a, b


class CpuClock:
  """Process CPU seconds and (on Linux) CPU seconds the whole machine spent busy."""

  def __init__(self):
    self.process = self.machine = 0.0
    self._start = None

  @staticmethod
  def _read():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy = float('nan')
    try:
      with open('/proc/stat') as f:
        fields = [int(v) for v in f.readline().split()[1:]]
      busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError):
      pass
    return usage.ru_utime + usage.ru_stime, busy

  def __enter__(self):
    self._start = self._read()
    return self

  def __exit__(self, *exc):
    process, machine = self._read()
    self.process += process - self._start[0]
    self.machine += machine - self._start[1]


# ------------------------------------------------------------------------------------------------
# Train steps.

def default_ghl_layers(model_name: str):
  """The t_inv mapping and governed kernels of the benchmark (DeepHebb: the paper's)."""
  return (DEEPHEBB_T_INV if model_name.startswith('deephebb') else 1.0), None


def build_step(model, variant: Variant, t_inv, total_steps: int):
  """``(jitted step, tx)`` of one variant."""
  rule = ghl_jax.Rule('softmax_oja', t_inv=t_inv) if variant.ghl else None
  tx = optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=total_steps,
                       use_ghl=variant.ghl, rule=rule)
  if variant.loop == 'user':
    step = loops.user_step(model, tx, rule)
  elif variant.loop == 'taps':
    step = ghl_jax.accel.wrap(loops.taps_step(model, tx, variant.ghl), variant.conv_impl)
  else:
    step = steps.make_train_step(model, tx, rule=rule, conv_impl=variant.conv_impl)
  return jax.jit(step, donate_argnums=(0,) if variant.donate else ()), tx


def init_variables(model, batch, compiler_options=None):
  """The model's variables, from one jitted ``init``."""
  init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))
  sample = batch['image'][:1]
  return init.lower(sample).compile(compiler_options=compiler_options)(sample)


def make_state(model, tx, batch, variables=None):
  """A train state of its own (steps donate it), from ``variables`` if given."""
  variables = jax.tree.map(jnp.copy, variables) if variables is not None else init_variables(model, batch)
  params = variables['params']
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(params),
          'rng': jax.random.key(1)}


@contextlib.contextmanager
def flax_max_pool(enable: bool):
  """While tracing: DeepHebb's 4×4/2 max pools as ``nn.max_pool`` (the code before
  ``models.pooling``), to measure that change."""
  if not enable:
    yield
    return
  fast = deephebb._max_pool                          # pylint: disable=protected-access
  deephebb._max_pool = lambda x: nn.max_pool(x, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))
  try:
    yield
  finally:
    deephebb._max_pool = fast


class Runner:
  """One variant's compiled step and state; ``run()`` does one step and returns its times."""

  def __init__(self, model, variant: Variant, batch, t_inv, total_steps: int, compiler_options=None,
               variables=None):
    self.variant, self.batch = variant, batch
    step, tx = build_step(model, variant, t_inv, total_steps)
    self.state = make_state(model, tx, batch, variables)
    start = time.perf_counter()
    with flax_max_pool(variant.flax_pool):
      self.compiled = step.lower(self.state, batch).compile(compiler_options=compiler_options)
    self.compile_s = time.perf_counter() - start
    self.xla_flops = xla_flops(self.compiled)
    self.times, self.cpu, self.machine = [], [], []
    self.loss = float('nan')

  def run(self, record: bool) -> None:
    with CpuClock() as clock:
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      block((self.state, metrics))
      wall = time.perf_counter() - start
    self.loss = float(metrics['loss'])
    if record:
      self.times.append(wall)
      self.cpu.append(clock.process)
      self.machine.append(clock.machine)


def load_average() -> str:
  try:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())
  except OSError:
    return 'n/a'


def run(args) -> dict:
  """Compiles every variant, times them round-robin with the matmul chain; returns the report."""
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  if args.malloc == 'keep':
    host_memory.keep_freed_memory()
  device = jax.devices()[0]
  size = args.matmul_size or (2048 if device.platform == 'cpu' else 8192)
  kwargs = {'num_classes': args.num_classes}
  if args.model.startswith(('deephebb', 'fasthebb')) or args.width != 1.0:
    kwargs['width'] = args.width
  built = {dtype: models.build(args.model, **kwargs, dtype=jnp.dtype(dtype))
           for dtype in dict.fromkeys(v.dtype for v in args.variant_list)}
  model = built.get('float32') or next(iter(built.values()))
  images = jax.random.normal(jax.random.key(2), (args.batch, args.image_size, args.image_size, args.channels))
  batch = {'image': images, 'label': jnp.arange(args.batch) % args.num_classes}
  t_inv, layers = default_ghl_layers(args.model)
  flops = model_flops(model, batch, layers)
  load_before = load_average()
  total = args.warmup + args.steps + 1
  variables = init_variables(model, batch)
  runners = [Runner(built[v.dtype], v, batch, t_inv, total, variables=variables) for v in args.variant_list]
  chains = {dtype: (matmul_chain(size, 8, jnp.dtype(dtype)), matmul_operands(size, jnp.dtype(dtype)))
            for dtype in dict.fromkeys(['float32', *built])}
  for (chain, _), operands in chains.values():
    block(chain(*operands))
  peaks = {dtype: [] for dtype in chains}
  cpu_peaks = {dtype: [] for dtype in chains}
  for round_ in range(args.warmup + args.steps):
    record = round_ >= args.warmup
    for runner in runners:
      runner.run(record)
    for dtype, ((chain, chain_flops), operands) in chains.items():
      with CpuClock() as clock:
        start = time.perf_counter()
        block(chain(*operands))
        wall = time.perf_counter() - start
      if record:
        peaks[dtype].append(chain_flops / wall)
        cpu_peaks[dtype].append(chain_flops / clock.process)
  peak_of = {dtype: statistics.median(p) for dtype, p in peaks.items()}
  cpu_peak_of = {dtype: statistics.median(p) for dtype, p in cpu_peaks.items()}
  peak, cpu_peak = peak_of['float32'], cpu_peak_of['float32']
  rows = []
  for r in runners:
    median = statistics.median(r.times)
    model_count = flops['GHL' if r.variant.ghl else 'BP']
    rows.append({
        'variant': r.variant.label, 'dtype': r.variant.dtype, 'median_s': median, 'min_s': min(r.times),
        'images_per_s': args.batch / median, 'model_flops': model_count, 'xla_flops': r.xla_flops,
        'fraction_of_peak': model_count / median / peak_of[r.variant.dtype], 'compile_s': r.compile_s,
        'loss': r.loss,
        'cores_busy': statistics.median(c / t for c, t in zip(r.cpu, r.times)),
        'cpu_s': statistics.median(r.cpu),
        'cpu_fraction_of_peak': model_count / statistics.median(r.cpu) / cpu_peak_of[r.variant.dtype],
        'other_cores': statistics.median((m - c) / t for m, c, t in zip(r.machine, r.cpu, r.times)),
    })
  return {'model': args.model, 'width': args.width, 'batch': args.batch, 'image_size': args.image_size,
          'steps': args.steps, 'warmup': args.warmup, 'device': device.device_kind,
          'platform': device.platform, 'jax': jax.__version__, 'matmul_size': size, 'peak_flops': peak,
          'cpu_peak_flops': cpu_peak, 'peak_flops_by_dtype': peak_of,
          'peak_spread': (min(peaks['float32']), max(peaks['float32'])), 'malloc': args.malloc,
          'load_before': load_before,
          'load_after': load_average(), 'cpu_count': os.cpu_count(), 'rows': rows}


def table(report: dict) -> str:
  cpu = report['platform'] == 'cpu'
  head = ('| variant | median step (ms) | images/s | model GFLOP | XLA GFLOP | TFLOP/s | % of peak |'
          + (' cores busy | others (cores) | CPU s | % of peak per CPU s |' if cpu else '')
          + ' compile (s) |')
  lines = [head, '|---' + '|---:' * (head.count('|') - 2) + '|']
  # '% of peak' is of the matmul peak in the variant's own compute dtype
  for r in report['rows']:
    achieved = r['model_flops'] / r['median_s']
    line = (f"| {r['variant']} | {1e3 * r['median_s']:.0f} | {r['images_per_s']:.1f} | "
            f"{r['model_flops'] / 1e9:.1f} | {r['xla_flops'] / 1e9:.1f} | {achieved / 1e12:.3f} | "
            f"{100 * r['fraction_of_peak']:.0f} |")
    if cpu:
      line += (f" {r['cores_busy']:.2f} | {r['other_cores']:.2f} | {r['cpu_s']:.2f} | "
               f"{100 * r['cpu_fraction_of_peak']:.0f} |")
    lines.append(line + f" {r['compile_s']:.1f} |")
  return '\n'.join(lines)


def ratios(report: dict) -> list[str]:
  """GHL/BP step-time ratios of the variant pairs that differ only in the mode."""
  by_label = {r['variant']: r for r in report['rows']}
  out = []
  for label, r in by_label.items():
    if 'GHL' in label:
      bp = by_label.get(label.replace('GHL', 'BP', 1))
      if bp:
        out.append(f"{label} / {bp['variant']}: step time {r['median_s'] / bp['median_s']:.3f} "
                   f"(model FLOPs {r['model_flops'] / bp['model_flops']:.3f})")
  return out


def main(argv=None):
  args = parse_args(argv)
  report = run(args)
  print(f"{report['model']} width {report['width']}, batch {report['batch']}, "
        f"{report['image_size']}x{report['image_size']}, {report['steps']} timed rounds after "
        f"{report['warmup']} warm-up; {report['device']} ({jax.device_count()} device(s), step on one, "
        f"{report['cpu_count']} CPUs), jax {report['jax']}, malloc {report['malloc']}")
  lo, hi = report['peak_spread']
  print(f"float32 matmul peak ({report['matmul_size']}² chain, median of rounds): "
        f"{report['peak_flops'] / 1e12:.3f} TFLOP/s (rounds {lo / 1e12:.3f}-{hi / 1e12:.3f}; "
        f"{report['cpu_peak_flops'] / 1e12:.3f} TFLOP per CPU s); "
        + ''.join(f"{dtype} peak {value / 1e12:.3f} TFLOP/s (float32 accumulation); "
                  for dtype, value in report['peak_flops_by_dtype'].items() if dtype != 'float32')
        + f"load average {report['load_before']} before, {report['load_after']} after\n")
  print(table(report))
  print()
  for line in ratios(report):
    print(line)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1, default=float)


if __name__ == '__main__':
  main()
