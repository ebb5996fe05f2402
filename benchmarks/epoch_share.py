"""Evaluation and input pipeline as shares of an epoch's training time, for every CIFAR config.

For each config file (and each of its training phases, e.g. SoftHebb's unsupervised phase at its
own batch size), with the trainer's own pieces (``methods.phases``, ``evaluation``, the tfds +
grain pipeline of ``ghl_jax.train.data``) on the real CIFAR-10 copy::

    train epoch  = steps per epoch × median train step (fixed batch, donated state)
    eval pass    = evaluation.evaluate over all 10,000 test images (second pass; the first compiles);
                   a probe phase's evaluation.ProbeEvaluation from its second call (the first
                   computes the features it keeps: "first" column)
    input epoch  = steps per epoch × the pipeline's time per batch alone (its threads then run
                   beside the step, so this bounds what it can take from training)

Goal: eval pass and input epoch each ≤ 10 % of the train epoch::

    python -m benchmarks.epoch_share                              # every CIFAR config below
    python -m benchmarks.epoch_share --configs cifar10_resnet_ghl --steps 3

CIFAR-100 configs share their CIFAR-10 counterparts' models, batch sizes and image shapes.
Writes ``--out`` (JSON) and (``--results``) the section "Evaluation and input: share of an epoch".
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.baselines import write_section  # noqa: E402
from benchmarks.input_rate import pipeline_rate  # noqa: E402
from ghl_jax import accel  # noqa: E402
from ghl_jax.train import data as data_lib  # noqa: E402
from ghl_jax.train import evaluation, loop, methods, steps  # noqa: E402

HEADING = '## Evaluation and input: share of an epoch'
CONFIGS = ('cifar10_deephebb_ghl', 'cifar10_deephebb_bp', 'cifar10_fasthebb_ghl', 'cifar10_deephebb_softhebb',
           'cifar10_fasthebb_swta', 'cifar10_resnet_ghl', 'cifar10_vit_ghl_attn_mlp')
GOAL = 0.10


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default=','.join(CONFIGS), help='config files of experiments/configs')
  parser.add_argument('--steps', type=int, default=5, help='timed train steps (after one warm-up)')
  parser.add_argument('--batches', type=int, default=100, help='pipeline batches timed')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', os.path.join(ROOT, 'tfds_data')))
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'epoch_share.json'))
  parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'RESULTS.md'),
                      help="RESULTS.md to update ('' to skip)")
  args = parser.parse_args(argv)
  args.config_list = [c.strip() for c in args.configs.split(',') if c.strip()]
  if args.steps < 1 or args.batches < 1 or not args.config_list:
    parser.error('--steps and --batches must be >= 1 and --configs non-empty.')
  return args


def load_config(name: str, data_dir: str):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  config.data.update({'data_dir': data_dir, 'download': False})
  return config


def _time_steps(step, state, batch, count: int) -> tuple:
  state, _ = step(state, batch)                              # compiled and warmed up
  jax.block_until_ready(state)
  times = []
  for _ in range(count):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def _time_evaluation(evaluate, state) -> tuple:
  """``(seconds of the second call, of the first (with compilation), metrics)``."""
  start = time.perf_counter()
  evaluate(state)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  result = evaluate(state)
  return time.perf_counter() - start, first_s, result


def measure(name: str, args) -> list:
  """One row per training phase of config ``name``."""
  config = load_config(name, args.data_dir)
  impl = config.get('conv_impl', 'auto')
  accel.prepare_host(impl)
  info = data_lib.info(config.data)
  total, per_epoch, first = methods.budget(config, info.num_train)
  model = loop.build_model(config, info.num_classes)
  sample = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  tx, phases, _ = methods.phases(config, model, sample, total, first)
  variables = jax.jit(lambda: model.init(jax.random.key(0), sample, train=False))()
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {}), 'opt_state': tx.init(variables['params']),
           'rng': jax.random.key(1)}
  mesh = loop.make_mesh()
  eval_step = jax.jit(steps.make_eval_step(model, impl))
  rows = []
  for phase in phases:
    batch = next(data_lib.train_batches(config.data, batch_size=phase.batch_size, seed=0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(phase.step_fn, donate_argnums=(0,))
    step_s, state = _time_steps(step, state, batch, args.steps)
    phase_per_epoch = info.num_train // phase.batch_size
    pipe = pipeline_rate(config.data, phase.batch_size, args.batches)
    rows.append({'config': name, 'phase': phase.name, 'batch': phase.batch_size,
                 'augment': config.data.get('augment', 'none'), 'steps_per_epoch': phase_per_epoch,
                 'step_s': step_s, 'train_epoch_s': phase_per_epoch * step_s,
                 'input_epoch_s': phase_per_epoch * pipe['batch_s'], 'evaluates': phase.evaluates})
  full = lambda state: evaluation.evaluate(eval_step, state, config, mesh)
  full_s, full_first_s, result = _time_evaluation(full, state)
  for row, phase in zip(rows, phases):
    eval_s, first_s = full_s, full_first_s
    if phase.probe:
      probe = evaluation.ProbeEvaluation(model, phase.probe, eval_step, config, mesh, conv_impl=impl)
      eval_s, first_s, probe_result = _time_evaluation(probe, state)
      assert abs(probe_result['eval/top1'] - result['eval/top1']) < 1e-3, (probe_result, result)
    row.update(eval_s=eval_s, eval_first_s=first_s, eval_batch=config.eval_batch_size,
               eval_examples=info.num_eval, eval_top1=result['eval/top1'],
               eval_share=eval_s / row['train_epoch_s'], input_share=row['input_epoch_s'] / row['train_epoch_s'])
    print(json.dumps(row), flush=True)
  return rows


def section(rows: list, args, load=None) -> str:
  """The RESULTS section of ``rows`` (``load``: the load averages to quote, else the current ones)."""
  load = os.getloadavg() if load is None else load
  verdict = lambda share: f'{100 * share:.1f} %' + ('' if share <= GOAL else ' (over)')
  lines = [HEADING, '',
           f'`python -m benchmarks.epoch_share` on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs, '
           f'load average {" ".join(f"{v:.2f}" for v in load)} at the end): the trainer\'s '
           f'train step ({args.steps} timed), the evaluation over the whole CIFAR-10 test split (a '
           f"probe phase's on the features it keeps; \"first\": the first call, with compilation and, "
           f'for a probe, the features) and the input pipeline alone, per config file and phase. '
           f'Goal: each ≤ {GOAL:.0%} of the epoch.', '',
           '| config | phase | batch | step (ms) | train epoch (s) | eval 10k (s) @ batch | first (s) '
           '| eval share | input epoch (s) | input share |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    share = verdict(r['eval_share']) if r['evaluates'] else 'none in this phase'
    lines.append(f"| {r['config']} | {r['phase']} | {r['batch']} | {1e3 * r['step_s']:.0f} | "
                 f"{r['train_epoch_s']:.0f} | {r['eval_s']:.1f} @ {r['eval_batch']} | {r['eval_first_s']:.1f} "
                 f"| {share} | {r['input_epoch_s']:.1f} | {verdict(r['input_share'])} |")
  worst_eval = max((r['eval_share'] for r in rows if r['evaluates']), default=0.0)
  worst_input = max(r['input_share'] for r in rows)
  lines += ['', f'Largest shares: evaluation {100 * worst_eval:.1f} %, input {100 * worst_input:.1f} % '
            f'(goal ≤ {GOAL:.0%}: {"met" if max(worst_eval, worst_input) <= GOAL else "NOT met"}).']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  args = parse_args(argv)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  rows = []
  for name in args.config_list:
    rows += measure(name, args)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows}, f, indent=1)
  text = section(rows, args)
  print(text)
  if args.results:
    write_section(args.results, text, HEADING)
  return rows


if __name__ == '__main__':
  main()
