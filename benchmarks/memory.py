"""Peak memory of the GHL train step vs the backprop step, from XLA's compiled memory analysis.

For each model it compiles (never runs) the project's train step (:func:`ghl_jax.train.steps.make_train_step`,
state donated, paper's two-group SGD) for GHL and for BP, with the backend's default
``conv_impl`` and with XLA's own convolutions, and reads XLA's buffer assignment::

    peak = arguments + outputs − aliased (donated) + temporaries

The Hebbian terms are computed inside the backward pass (from the patches of ``∂W`` with
``conv_impl='gemm'``, by the conv's vjp with 'xla'), so GHL should need little more than BP::

    python -m benchmarks.memory                                 # ResNet-50 @224 and ResNet-1202, batch 32
    python -m benchmarks.memory --models resnet20 --batch 8     # quick
    python -m benchmarks.memory --taps      # also GHL with the Hebbian terms from taps after the gradient
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import jax.numpy as jnp

import ghl_jax
from benchmarks import loops
from ghl_jax import accel, models, optim
from ghl_jax.train import steps

GIB = 2 ** 30
# name -> (model name, image side, classes)
MODELS = {
    'resnet50': ('resnet50', 224, 1000),
    'resnet1202': ('resnet1202', 32, 10),
    'resnet20': ('resnet20', 32, 10),
    'deephebb': ('deephebb', 32, 10),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='resnet50,resnet1202', help=f'comma-separated, of {sorted(MODELS)}')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--conv-impls', default='auto,xla', help="comma-separated conv_impl values")
  parser.add_argument('--taps', action='store_true',
                      help='also GHL with every Hebbian term from taps (the v1 loop of benchmarks.loops.taps_step)')
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  args.model_list = [m.strip() for m in args.models.split(',')]
  unknown = [m for m in args.model_list if m not in MODELS]
  if unknown or args.batch < 1:
    parser.error(f'unknown models {unknown} (choose from {sorted(MODELS)}) or --batch < 1.')
  args.impls = [i.strip() for i in args.conv_impls.split(',')]
  for impl in args.impls:
    try:
      accel.resolve(impl)
    except ValueError as error:
      parser.error(str(error))
  return args


def peak_bytes(compiled) -> dict:
  """XLA's buffer sizes of a compiled step and the peak they add up to."""
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes}
  out['peak'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  return out


def state_spec(model, tx, image_shape):
  """Shapes of the train state, without computing it."""
  def init():
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + image_shape), train=False)
    params = variables['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(params),
            'rng': jax.random.key(1)}
  return jax.eval_shape(init)


def compile_step(name: str, batch: int, ghl: bool, conv_impl: str, fuse_hebbian: bool = True) -> dict:
  """Compiles one train step; returns its memory analysis and compile time."""
  model_name, side, classes = MODELS[name]
  model = models.build(model_name, num_classes=classes)
  rule = ghl_jax.Rule('softmax_oja') if ghl else None
  tx = optim.paper_sgd(lr=5e-3, lr_conv=1e-2, wd_conv=5e-2, total_steps=1000, use_ghl=ghl, rule=rule)
  if fuse_hebbian:
    step = steps.make_train_step(model, tx, rule=rule, conv_impl=conv_impl)
  else:
    step = accel.wrap(loops.taps_step(model, tx, ghl), conv_impl)
  step = jax.jit(step, donate_argnums=(0,))
  spec = {'image': jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  start = time.perf_counter()
  compiled = step.lower(state_spec(model, tx, (side, side, 3)), spec).compile()
  return {'model': name, 'batch': batch, 'mode': ('GHL' if fuse_hebbian else 'GHL taps') if ghl else 'BP',
          'conv_impl': f'{conv_impl} ({accel.resolve(conv_impl)})',
          'compile_s': time.perf_counter() - start, **peak_bytes(compiled)}


def table(rows) -> str:
  taps = any(r['mode'] == 'GHL taps' for r in rows)
  lines = ['| model | batch | conv_impl | BP peak (GiB) | GHL peak (GiB) | GHL / BP | GHL temp (GiB) '
           '| BP temp (GiB) |' + (' GHL from taps (GiB) | taps / BP |' if taps else ''),
           '|---|---:|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if taps else '')]
  pairs = {}
  for r in rows:
    pairs.setdefault((r['model'], r['batch'], r['conv_impl']), {})[r['mode']] = r
  for (model, batch, impl), pair in pairs.items():
    if 'GHL' not in pair or 'BP' not in pair:
      continue
    g, b = pair['GHL'], pair['BP']
    line = (f"| {model} | {batch} | {impl} | {b['peak'] / GIB:.2f} | {g['peak'] / GIB:.2f} | "
            f"{g['peak'] / b['peak']:.3f} | {g['temporaries'] / GIB:.2f} | {b['temporaries'] / GIB:.2f} |")
    if taps:
      t = pair.get('GHL taps')
      line += f" {t['peak'] / GIB:.2f} | {t['peak'] / b['peak']:.3f} |" if t else ' | |'
    lines.append(line)
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  rows = []
  for name in args.model_list:
    for impl in args.impls:
      for ghl, fuse in ((False, True), (True, True)) + (((True, False),) if args.taps else ()):
        rows.append(compile_step(name, args.batch, ghl, impl, fuse))
        r = rows[-1]
        print(f"{name} {r['mode']} conv_impl {r['conv_impl']}: peak {r['peak'] / GIB:.2f} GiB "
              f"(compiled in {r['compile_s']:.0f} s)", flush=True)
  print(f'\nXLA memory analysis of the donated train step on {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__}\n')
  print(table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
