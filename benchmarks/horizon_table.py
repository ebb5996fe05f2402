"""The tables of ``benchmarks/horizon.sh``'s runs: test top-1 per epoch of GHL and BP, their pace, and
the gradient alignment over the run.

    python -m benchmarks.horizon_table ROOT           # ROOT as given to horizon.sh (ROOT/ghl, ROOT/bp)

Pace: a run's images/s is the median over its logged intervals of ``Δstep · batch / Δtime``; its
training time sums those intervals but leaves out any longer than ``--gap-s`` (the run was stopped
or paused there: a resumed run spans several sessions), so it is time spent training and evaluating.
Alignment (``align/<layer>/<measure>``, :mod:`ghl_jax.diagnostics`): the mean over the run's log
steps, and the first and last tenth of them; in the BP run these say what GHL would have done
(``config.ghl.shadow``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from ghl_jax.train import metrics, run_config

MEASURES = ('cos_update', 'cos_magnitude', 'near_zero', 'top_overlap')


def evals(rows: list) -> dict:
  """``{step: top-1 %}`` of the run's evaluations."""
  return {r['step']: 100 * r['eval/top1'] for r in rows if 'eval/top1' in r}


def pace(rows: list, batch_size: int, gap_s: float) -> tuple[float, float]:
  """(median images/s, hours spent training) from the logged rows' steps and times."""
  logged = [(r['step'], r['time']) for r in rows if 'loss' in r]
  intervals = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(logged, logged[1:]) if 0 < t1 - t0 <= gap_s]
  rate = statistics.median(steps * batch_size / seconds for steps, seconds in intervals) if intervals else 0.0
  return rate, sum(seconds for _, seconds in intervals) / 3600


def alignment(rows: list) -> dict:
  """``{(layer, measure): (mean, first tenth's mean, last tenth's mean)}``."""
  series = {}
  for row in rows:
    for key, value in row.items():
      if key.startswith('align/'):
        _, layer, measure = key.split('/')
        series.setdefault((layer, measure), []).append(value)
  tenth = lambda values: max(1, len(values) // 10)
  return {key: (statistics.fmean(v), statistics.fmean(v[:tenth(v)]), statistics.fmean(v[-tenth(v):]))
          for key, v in series.items()}


def tables(root: str, gap_s: float) -> str:
  runs = {name: metrics.read(os.path.join(root, name)) for name in ('ghl', 'bp')
          if os.path.exists(os.path.join(root, name, 'metrics.jsonl'))}
  if not runs:
    raise SystemExit(f'error: {root} holds neither ghl/ nor bp/ with a metrics.jsonl: pass horizon.sh\'s ROOT.')
  top1 = {name: evals(rows) for name, rows in runs.items()}
  steps = sorted(set().union(*top1.values()))
  first = steps[0] if steps else 1
  lines = ['| epoch | step | GHL test top-1 (%) | BP test top-1 (%) | GHL − BP (pt) |', '|---:|---:|---:|---:|---:|']
  for step in steps:
    ghl, bp = top1.get('ghl', {}).get(step), top1.get('bp', {}).get(step)
    cell = lambda v: f'{v:.2f}' if v is not None else '(pending)'
    gap = f'{ghl - bp:+.2f}' if ghl is not None and bp is not None else ''
    lines.append(f'| {round(step / first)} | {step} | {cell(ghl)} | {cell(bp)} | {gap} |')
  lines += ['', '| run | images/s (median) | hours training | log steps |', '|---|---:|---:|---:|']
  for name, rows in runs.items():
    batch = (run_config.read(os.path.join(root, name)) or {}).get('batch_size', 64)
    rate, hours = pace(rows, batch, gap_s)
    lines.append(f'| {name.upper()} | {rate:.1f} | {hours:.2f} | {sum("loss" in r for r in rows)} |')
  lines += ['', '| run | layer | ' + ' | '.join(MEASURES) + ' |', '|---|---|' + '---:|' * len(MEASURES)]
  for name, rows in runs.items():
    aligned = alignment(rows)
    for layer in sorted({layer for layer, _ in aligned}):
      cells = []
      for measure in MEASURES:
        mean, early, late = aligned.get((layer, measure), (float('nan'),) * 3)
        cells.append(f'{mean:.2f} ({early:.2f} → {late:.2f})' if mean == mean else '—')
      lines.append(f'| {name.upper()}{" (shadow)" if name == "bp" else ""} | {layer} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('root', help='the ROOT folder given to benchmarks/horizon.sh')
  parser.add_argument('--gap-s', type=float, default=900.0,
                      help='a logged interval longer than this is a stop or a pause, not training')
  args = parser.parse_args(argv)
  print(tables(args.root, args.gap_s))
  return 0


if __name__ == '__main__':
  sys.exit(main())
