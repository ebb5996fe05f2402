"""GHL vs backprop train steps on an accelerator: DeepHebb on CIFAR-10 shapes and ResNet-50 on
ImageNet shapes (synthetic data), float32 and bfloat16 compute, printed as one table.

For every (model, dtype) it compiles the project's donated train step for GHL and for BP
(:func:`ghl_jax.train.steps.make_train_step`, paper's two-group SGD), runs them in turn step by step
and reports per mode: median step time, images/s, model FLOPs per step (as in
:mod:`benchmarks.step_time`), achieved FLOP/s as a share of a bfloat16 matmul peak measured at
the start of the same run, XLA's planned peak memory of the step and the device's memory
high-water mark. It stops starting new models/dtypes after ``--budget-s`` so that one call
ends within 8 minutes (``benchmarks/accelerator.sh`` adds a hard timeout)::

    bash benchmarks/accelerator.sh                 # on a GPU/TPU host
    python -m benchmarks.accelerator --tiny        # smoke run on CPU: tiny widths and shapes

``--tiny`` keeps every code path (both models' block types, both dtypes, GHL and BP) with
width 1/16, 32×32 images, batch 4 and ResNet-50's blocks in two stages of one block each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from benchmarks import memory as memory_lib
from benchmarks import step_time
from ghl_jax import models
from ghl_jax.kernels import host_memory

GIB = 2 ** 30
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TINY_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}   # tiny runs: compile time dominates


def model_settings(name: str, args) -> dict:
  """Builder kwargs, image side and batch of one benchmark model (tiny or full size)."""
  if name == 'deephebb':
    return {'build': 'deephebb', 'kwargs': {'num_classes': 10, 'width': 1 / 16 if args.tiny else 1.0},
            'side': 32, 'batch': 4 if args.tiny else args.deephebb_batch, 't_inv': step_time.DEEPHEBB_T_INV}
  if name == 'resnet50':
    kwargs = {'num_classes': 1000}
    if args.tiny:
      kwargs.update(width=1 / 16, stage_sizes=(1, 1))
    return {'build': 'resnet50', 'kwargs': kwargs, 'side': 32 if args.tiny else 224,
            'batch': 4 if args.tiny else args.resnet_batch, 't_inv': 1.0}
  raise ValueError(f'Unknown benchmark model {name!r}; choose deephebb or resnet50.')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='tiny widths and shapes (CPU smoke run)')
  parser.add_argument('--models', default='deephebb,resnet50')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--deephebb-batch', type=int, default=256)
  parser.add_argument('--resnet-batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=0, help='timed rounds (0: 20, tiny 2)')
  parser.add_argument('--warmup', type=int, default=-1, help='untimed rounds (-1: 3, tiny 1)')
  parser.add_argument('--conv-impl', default='auto', help="'auto' (XLA's convs on GPU/TPU), 'xla' or 'gemm'")
  parser.add_argument('--matmul-size', type=int, default=0, help='peak matmul side (0: 8192, tiny 256)')
  parser.add_argument('--budget-s', type=float, default=330.0,
                      help='start no new model/dtype after this many seconds')
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  args.model_list = [m.strip() for m in args.models.split(',') if m.strip()]
  args.dtype_list = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  bad = [d for d in args.dtype_list if d not in DTYPES]
  if bad:
    parser.error(f'unknown dtypes {bad}; choose from {sorted(DTYPES)}.')
  for name in args.model_list:
    try:
      model_settings(name, args)
    except ValueError as error:
      parser.error(str(error))
  args.steps = args.steps or (2 if args.tiny else 20)
  args.warmup = args.warmup if args.warmup >= 0 else (1 if args.tiny else 3)
  args.matmul_size = args.matmul_size or (256 if args.tiny else 8192)
  return args


def matmul_peak(size: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of a chain of ``size × size`` products in ``dtype`` (float32 accumulation)."""
  length = 4 if size <= 1024 else 16
  chain, flops = step_time.matmul_chain(size, length, dtype)
  operands = step_time.matmul_operands(size, dtype)
  step_time.block(chain(*operands))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step_time.block(chain(*operands))
    times.append(time.perf_counter() - start)
  return flops / statistics.median(times)


def device_high_water() -> float:
  """The device's peak bytes in use so far (nan where the backend does not say)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get('peak_bytes_in_use', float('nan')))


def run_pair(name: str, dtype_name: str, args) -> list[dict]:
  """GHL and BP of one model and dtype, compiled, then timed in turn; one row each."""
  settings = model_settings(name, args)
  model = models.build(settings['build'], dtype=DTYPES[dtype_name], **settings['kwargs'])
  images = jax.random.normal(jax.random.key(2), (settings['batch'], settings['side'], settings['side'], 3))
  batch = {'image': images, 'label': jnp.arange(settings['batch']) % settings['kwargs']['num_classes']}
  flops = step_time.model_flops(model, batch)
  total = args.warmup + args.steps + 1
  options = TINY_COMPILER_OPTIONS if args.tiny else None
  variables = step_time.init_variables(model, batch, options)
  runners = [step_time.Runner(model, step_time.Variant(mode, mode == 'GHL', args.conv_impl), batch,
                              settings['t_inv'], total, options, variables) for mode in ('GHL', 'BP')]
  for round_ in range(args.warmup + args.steps):
    for runner in runners:
      runner.run(round_ >= args.warmup)
  high_water = device_high_water()
  rows = []
  for r in runners:
    median = statistics.median(r.times)
    rows.append({'model': name, 'dtype': dtype_name, 'mode': r.variant.label, 'batch': settings['batch'],
                 'median_s': median, 'images_per_s': settings['batch'] / median,
                 'model_flops': flops[r.variant.label],
                 'xla_peak_bytes': memory_lib.peak_bytes(r.compiled)['peak'],
                 'device_high_water_bytes': high_water, 'compile_s': r.compile_s, 'loss': r.loss})
  return rows


def table(rows, bf16_peak: float) -> str:
  lines = ['| model | dtype | mode | batch | step (ms) | images/s | TFLOP/step | TFLOP/s | % of bf16 peak '
           '| XLA peak (GiB) | device high-water (GiB) | GHL/BP time | compile (s) |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  by_key = {(r['model'], r['dtype'], r['mode']): r for r in rows}
  for r in rows:
    achieved = r['model_flops'] / r['median_s']
    bp = by_key.get((r['model'], r['dtype'], 'BP'))
    ratio = f"{r['median_s'] / bp['median_s']:.3f}" if r['mode'] == 'GHL' and bp else ''
    lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['batch']} | {1e3 * r['median_s']:.1f} | "
                 f"{r['images_per_s']:.0f} | {r['model_flops'] / 1e12:.3f} | {achieved / 1e12:.2f} | "
                 f"{100 * achieved / bf16_peak:.1f} | {r['xla_peak_bytes'] / GIB:.2f} | "
                 f"{r['device_high_water_bytes'] / GIB:.2f} | {ratio} | {r['compile_s']:.0f} |")
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  device = jax.devices()[0]
  if device.platform == 'cpu':
    if not args.tiny:
      raise SystemExit('JAX sees no GPU/TPU (backend cpu): install jax for the accelerator '
                       '(e.g. jax[cuda12]) or pass --tiny.')
    host_memory.keep_freed_memory()
  print(f'{device.device_kind} ({device.platform}, {jax.device_count()} device(s), step on one), '
        f'jax {jax.__version__}{", tiny shapes" if args.tiny else ""}', flush=True)
  peaks = {name: matmul_peak(args.matmul_size, DTYPES[name]) for name in ('bfloat16', 'float32')}
  print(f"matmul peak ({args.matmul_size}² chain): bfloat16 {peaks['bfloat16'] / 1e12:.2f} TFLOP/s, "
        f"float32 {peaks['float32'] / 1e12:.2f} TFLOP/s (default precision)", flush=True)
  rows, skipped = [], []
  pairs = [(name, dtype_name) for name in args.model_list for dtype_name in args.dtype_list]
  try:
    for name, dtype_name in pairs:
      if time.perf_counter() - start > args.budget_s:
        break
      rows.extend(run_pair(name, dtype_name, args))
      print(f'{name} {dtype_name}: done at {time.perf_counter() - start:.0f} s', flush=True)
  except KeyboardInterrupt:                  # the hard timeout of accelerator.sh: keep what is done
    print('interrupted', flush=True)
  done = {(r['model'], r['dtype']) for r in rows}
  skipped = [f'{name}/{dtype_name}' for name, dtype_name in pairs if (name, dtype_name) not in done]
  print()
  print(table(rows, peaks['bfloat16']))
  if skipped:
    print(f"\nnot run (time budget {args.budget_s:.0f} s): {', '.join(skipped)}")
  print(f'\ntotal {time.perf_counter() - start:.0f} s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': device.device_kind, 'peaks': peaks, 'rows': rows, 'skipped': skipped}, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
