"""What bfloat16 compute does to GHL: accuracy after a short paper-recipe run, and the sign of
the gradient that GHL's update keeps.

Every run is the real CIFAR-10 DeepHebb GHL config (``experiments/configs/cifar10_deephebb_ghl``,
the paper's recipe at full width) trained by ``ghl_jax.train.train_and_evaluate`` for ``--steps``
steps of 64 images in ``compute_dtype`` float32 and bfloat16, once per seed; one evaluation on the
whole test split at the end. Params, optimizer state and Hebbian sums stay float32 in both.

Sign agreement: GHL updates ``sign(G) ⊙ |Ĥ|``, so what bf16 may change is ``sign(G)``. For the same
params (the float32 run's initial and final ones) and the same ``--sign-batches`` training
batches, the governed kernels' gradients are computed in both dtypes (``ghl_jax.value_and_grad``,
models built in each dtype) and compared where the float32 gradient is large::

    agreement = mean_{i: |G32_i| > 0.05·rms(G32)} [sign G16_i = sign G32_i]

::

    python -m benchmarks.bf16_study                      # 300 steps, seeds 0,1 (about 20 min)
    python -m benchmarks.bf16_study --steps 20 --seeds 0 --eval_examples 500

Writes ``--out`` (JSON) and (``--results``) the section "bfloat16 accuracy and sign agreement" of
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

import ghl_jax  # noqa: E402
from benchmarks.baselines import write_section  # noqa: E402
from experiments.configs import recipes  # noqa: E402
from ghl_jax.train import data as data_lib  # noqa: E402
from ghl_jax.train import loop, plots, validate  # noqa: E402

HEADING = '## bfloat16 accuracy and sign agreement'
DTYPES = ('float32', 'bfloat16')
THRESHOLD = 0.05                 # of the float32 gradient's rms: entries whose sign is compared


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seeds', default='0,1', help='comma-separated seeds')
  parser.add_argument('--eval_examples', type=int, default=10_000, help='first N test images')
  parser.add_argument('--sign-batches', type=int, default=4, help='training batches for the sign check')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', os.path.join(ROOT, 'tfds_data')))
  parser.add_argument('--workdir', default='/tmp/ghl_bf16_study')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'bf16_study.json'))
  parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'RESULTS.md'),
                      help="RESULTS.md to update ('' to skip)")
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  if args.steps < 1 or not args.seeds or args.eval_examples < 1 or args.sign_batches < 1:
    parser.error('--steps, --eval_examples and --sign-batches must be >= 1 and --seeds non-empty.')
  return args


def config_for(args, dtype: str, seed: int):
  """The paper-recipe GHL config at this study's budget."""
  c = recipes.cifar('cifar10', 'deephebb', 'ghl')
  c.data.update({'data_dir': args.data_dir, 'download': False,
                 'eval_split': f'test[:{args.eval_examples}]'})
  c.compute_dtype, c.seed = dtype, seed
  c.num_train_steps = args.steps
  c.eval_every_steps = c.checkpoint_every_steps = args.steps
  c.log_every_steps = max(args.steps // 6, 1)
  c.compilation_cache_dir = None
  return c


def train(args, dtype: str, seed: int) -> dict:
  config = config_for(args, dtype, seed)
  workdir = os.path.join(args.workdir, f'{dtype}_seed{seed}')
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  final = loop.train_and_evaluate(config, workdir)
  return {'dtype': dtype, 'seed': seed, 'top1': 100 * final['eval/top1'],
          'wall_s': time.perf_counter() - start, 'workdir': workdir}


def _loss(model):
  def loss(params, batch_stats, images, labels):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                            mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
  return loss


def gradients(config, dtype: str, params, batch_stats, batches) -> dict:
  """The governed kernels' gradients on ``batches`` (summed) with the model in ``dtype``."""
  config = config.copy_and_resolve_references()
  config.compute_dtype = dtype
  model = loop.build_model(config, num_classes=10)
  grad_fn = jax.jit(ghl_jax.value_and_grad(_loss(model), validate.rule_of(config)))
  total = None
  for images, labels in batches:
    _, grads, hebb = grad_fn(params, batch_stats, images, labels)
    flat = traverse_util.flatten_dict(grads, sep='/')
    picked = {path: np.asarray(flat[path], np.float64) for path in hebb}
    total = picked if total is None else {k: total[k] + v for k, v in picked.items()}
  return total


def agreement(g16: dict, g32: dict) -> dict:
  """Per kernel and over all: the share of large float32 entries whose bf16 sign agrees."""
  out, agree, count = {}, 0, 0
  for path, reference in g32.items():
    large = np.abs(reference) > THRESHOLD * np.sqrt(np.mean(reference ** 2))
    same = np.sign(g16[path][large]) == np.sign(reference[large])
    out[path] = float(same.mean())
    agree, count = agree + int(same.sum()), count + int(large.sum())
  out['all'] = agree / count
  return out


def sign_study(args, seed: int) -> dict:
  """Sign agreement at the float32 run's initial and final params."""
  config = config_for(args, 'float32', seed)
  model = loop.build_model(config, num_classes=10)
  batches = []
  for batch in data_lib.train_batches(config.data, batch_size=config.batch_size, seed=seed):
    batches.append((jnp.asarray(batch['image']), jnp.asarray(batch['label'])))
    if len(batches) == args.sign_batches:
      break
  variables = model.init(jax.random.key(seed), batches[0][0][:1], train=False)
  final = jax.tree.map(jnp.asarray, plots.latest_params(os.path.join(args.workdir, f'float32_seed{seed}')))
  result = {}
  for label, params in (('init', variables['params']), ('final', final)):
    g32 = gradients(config, 'float32', params, variables['batch_stats'], batches)
    g16 = gradients(config, 'bfloat16', params, variables['batch_stats'], batches)
    result[label] = agreement(g16, g32)
  return result


def _mean_std(values) -> str:
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def section(runs: list, signs: dict, args) -> str:
  lines = [HEADING, '',
           f'CIFAR-10, DeepHebb full width, the paper\'s GHL recipe, {args.steps} steps × 64, test top-1 on '
           f'{args.eval_examples} test images, seeds {",".join(map(str, args.seeds))} '
           f'(`python -m benchmarks.bf16_study`). Params, optimizer state and Hebbian sums float32.', '',
           '| compute dtype | test top-1 (%) | per seed | wall per run (s) |', '|---|---:|---|---:|']
  for dtype in DTYPES:
    mine = [r for r in runs if r['dtype'] == dtype]
    lines.append(f"| {dtype} | {_mean_std([r['top1'] for r in mine])} | "
                 f"{', '.join(format(r['top1'], '.2f') for r in mine)} | "
                 f"{statistics.median(r['wall_s'] for r in mine):.0f} |")
  gap = (statistics.mean(r['top1'] for r in runs if r['dtype'] == 'bfloat16')
         - statistics.mean(r['top1'] for r in runs if r['dtype'] == 'float32'))
  lines += ['', f'bfloat16 − float32: {gap:+.2f} pt (goal: within 0.5 pt).', '',
            f'Sign agreement of the bf16 gradient with the float32 one where |G| > {THRESHOLD:.0%} of its rms '
            f'(governed kernels, {args.sign_batches} training batches summed):', '',
            '| seed | params | ' + ' | '.join(k for k in next(iter(signs.values()))['init']) + ' |',
            '|---|---|' + '---:|' * len(next(iter(signs.values()))['init'])]
  for seed, result in signs.items():
    for label, values in result.items():
      lines.append(f'| {seed} | {label} | ' + ' | '.join(f'{100 * v:.2f} %' for v in values.values()) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  args = parse_args(argv)
  runs = [train(args, dtype, seed) for seed in args.seeds for dtype in DTYPES]
  for run in runs:
    print(json.dumps(run), flush=True)
  signs = {seed: sign_study(args, seed) for seed in args.seeds}
  print(json.dumps(signs), flush=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'runs': runs, 'signs': signs}, f, indent=1)
  text = section(runs, signs, args)
  print(text)
  if args.results:
    write_section(args.results, text, HEADING)


if __name__ == '__main__':
  main()
