"""A user's own training loop (public API only) beside the trainer's step, in one run.

For each model it times, round-robin with the float32 matmul chain (see :mod:`benchmarks.step_time`):

* ``user GHL`` / ``user BP`` — the README's "Use it in your own code" loop
  (:func:`benchmarks.loops.user_step`: ``ghl_jax.value_and_grad`` + ``tx.update(..., hebb=hebb)``);
* ``GHL`` / ``BP`` — the trainer's step (:func:`ghl_jax.train.steps.make_train_step`);
* ``user GHL v1`` / ``user BP v1`` — the v1 loop a user wrote before ``value_and_grad``
  (``ghl_jax.tap`` + ``jax.value_and_grad``, XLA's convolutions).

and checks the goals: user-loop GHL within 5% of the trainer's GHL step, at ≥ 80% of the matmul
peak measured in the same run, GHL/BP ≤ 1.35::

    python -m benchmarks.user_loop                       # DeepHebb batch 64, ResNet-56 batch 8
    python -m benchmarks.user_loop --steps 5 --json user_loop.json
"""
from __future__ import annotations

import argparse
import json

import jax

from benchmarks import step_time

# name -> step_time arguments
CASES = {
    'deephebb': ['--model', 'deephebb', '--batch', '64'],
    'resnet56': ['--model', 'resnet56', '--batch', '8'],
}
VARIANTS = step_time.GROUPS['user']


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, of {sorted(CASES)}')
  parser.add_argument('--steps', type=int, default=10, help='timed rounds per case')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--width', type=float, default=1.0, help='DeepHebb width (1: the paper)')
  parser.add_argument('--matmul-size', type=int, default=0)
  parser.add_argument('--json', default='', help='also write the reports to this JSON file')
  args = parser.parse_args(argv)
  args.case_list = [c.strip() for c in args.cases.split(',')]
  unknown = [c for c in args.case_list if c not in CASES]
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {sorted(CASES)}.')
  return args


def goals(report: dict) -> list[str]:
  """The three goals of the user loop, each as one line with its measured value."""
  rows = {r['variant']: r for r in report['rows']}
  user, trainer, bp = rows['user GHL'], rows['GHL'], rows['user BP']
  gap = user['median_s'] / trainer['median_s'] - 1
  ratio = user['median_s'] / bp['median_s']
  peak = user['fraction_of_peak']
  mark = lambda ok: 'met' if ok else 'NOT met'
  return [f'user GHL vs trainer GHL: {100 * gap:+.1f}% (goal within 5%): {mark(abs(gap) <= 0.05)}',
          f'user GHL at {100 * peak:.0f}% of the matmul peak (goal >= 80%): {mark(peak >= 0.80)}',
          f'user GHL / user BP: {ratio:.3f} (goal <= 1.35): {mark(ratio <= 1.35)}',
          f"v1 user loop GHL / user GHL: {rows['user GHL v1']['median_s'] / user['median_s']:.2f}x"]


def main(argv=None):
  args = parse_args(argv)
  reports = {}
  for case in args.case_list:
    common = ['--steps', str(args.steps), '--warmup', str(args.warmup), '--variants', ','.join(VARIANTS),
              '--matmul-size', str(args.matmul_size)]
    if case == 'deephebb':
      common += ['--width', str(args.width)]
    report = step_time.run(step_time.parse_args(CASES[case] + common))
    reports[case] = report
    print(f"\n## {case}, batch {report['batch']}: matmul peak {report['peak_flops'] / 1e12:.3f} TFLOP/s, "
          f"load {report['load_before']} -> {report['load_after']}, jax {jax.__version__}")
    print(step_time.table(report))
    for line in step_time.ratios(report) + goals(report):
      print('- ' + line)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(reports, f, indent=1, default=float)
  return reports


if __name__ == '__main__':
  main()
