"""Baselines and GHL ablations at equal small budgets: test accuracy and training images/s.

Every row is a real config of ``experiments/configs`` (the paper's recipe, the baselines' and
the ablations') trained by ``ghl_jax.train.train_and_evaluate``, shrunk to the same budget:
width ``--width``, ``--steps × 64`` training images in all (the Hebbian baselines spend half of
them in their unsupervised phase at their own batch size, the other half in the probe), one
evaluation at the end on the first ``--eval_examples`` test images. Images/s are measured
between progress logs after each phase's first log, so compilation is left out::

    python -m benchmarks.baselines                            # Fashion-MNIST and CIFAR-10
    python -m benchmarks.baselines --datasets cifar10 --rows ghl,softhebb --steps 100
    python -m benchmarks.baselines --datasets cifar10 --rows ghl,bp --seeds 0,1,2   # seeds pooled

With several ``--seeds`` every row is trained once per seed (workdir ``ROW_seedN``) and the table
is ``experiments.report``'s: last test top-1 as mean ± std over the seeds.

Writes ``--out`` (``benchmarks/baselines.json``), receptive fields of the first conv layer to
``benchmarks/figures/`` (one seed) and (``--results``) the section "Baselines and ablations"
(or, over seeds, "Baselines and ablations over seeds") of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402

from experiments.configs import baselines as baseline_recipes  # noqa: E402
from experiments.configs import common  # noqa: E402
from experiments.configs import recipes  # noqa: E402
from ghl_jax.train import data as data_lib  # noqa: E402
from ghl_jax.train import metrics as metrics_lib  # noqa: E402
from ghl_jax.train import plots  # noqa: E402
from ghl_jax import train  # noqa: E402

BATCH = 64
HEADING = '## Baselines and ablations'
POOLED_HEADING = '## Baselines and ablations over seeds'

R = baseline_recipes
# name -> (architecture, paper method key, label, config builder(dataset))
ROWS = {
    'ghl': ('deephebb', 'ghl', 'GHL', lambda d: recipes.cifar(d, 'deephebb', 'ghl')),
    'bp': ('deephebb', 'bp', 'E2E BP (paper SGD)', lambda d: recipes.cifar(d, 'deephebb', 'bp')),
    'bp_strong': ('deephebb', None, 'E2E BP (Nesterov)', lambda d: R.cifar_bp_strong(d, 'deephebb')),
    'softhebb': ('deephebb', 'softhebb', 'SoftHebb', R.cifar_softhebb),
    'softhebb_1epoch': ('deephebb', 'softhebb', 'SoftHebb, full Hebbian epoch', R.cifar_softhebb),
    'fh_ghl': ('fasthebb', 'ghl', 'GHL', lambda d: recipes.cifar(d, 'fasthebb', 'ghl')),
    'fh_bp': ('fasthebb', 'bp', 'E2E BP (paper SGD)', lambda d: recipes.cifar(d, 'fasthebb', 'bp')),
    'fh_bp_strong': ('fasthebb', None, 'E2E BP (Nesterov)', lambda d: R.cifar_bp_strong(d, 'fasthebb')),
    'swta': ('fasthebb', 'swta', 'SWTA-FH', lambda d: R.cifar_fasthebb(d, 'swta')),
    'hpca': ('fasthebb', 'hpca', 'HPCA-FH', lambda d: R.cifar_fasthebb(d, 'hpca')),
    **{f'ablation_{name}': ('deephebb', None, f'GHL ablation: {name}',
                            lambda d, name=name: _on_dataset(R.ghl_ablation(name), d))
       for name in R.ABLATIONS},
}
ABLATION_ROWS = tuple(f'ablation_{name}' for name in R.ABLATIONS)
# Rows off the equal budget: the recipe's whole unsupervised epoch, then the budget's probe.
FULL_HEBBIAN_ROWS = ('softhebb_1epoch',)
FIELD_ROWS = ('ghl', 'softhebb', 'softhebb_1epoch', 'swta', 'hpca')


def _on_dataset(c, dataset):
  c.data.name = dataset
  return c


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', default='fashion_mnist,cifar10')
  parser.add_argument('--rows', default='', help=f'comma-separated subset of {sorted(ROWS)}')
  parser.add_argument('--ablations_on', default='cifar10',
                      help='dataset(s) of the ablation rows and of the full-epoch SoftHebb row')
  parser.add_argument('--steps', type=int, default=150, help='budget: steps of 64 images')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--seeds', default='0', help='comma-separated seeds; several: one run per seed, pooled')
  parser.add_argument('--eval_examples', type=int, default=5_000)
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', os.path.join(ROOT, 'tfds_data')))
  parser.add_argument('--workdir', default='/tmp/ghl_jax_baselines')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'baselines.json'))
  parser.add_argument('--figures', default=os.path.join(ROOT, 'benchmarks', 'figures'))
  parser.add_argument('--results', default='', help='RESULTS.md whose section to rewrite')
  parser.add_argument('--reuse', action='store_true',
                      help='keep the rows already in --out (same budget) instead of training them again')
  args = parser.parse_args(argv)
  unknown = set(filter(None, args.rows.split(','))) - set(ROWS)
  if unknown:
    parser.error(f'unknown rows {sorted(unknown)}; choose from {sorted(ROWS)}.')
  if args.steps < 8 or not args.width > 0:
    parser.error('--steps must be >= 8 and --width > 0.')
  try:
    args.seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError:
    parser.error(f'--seeds takes comma-separated integers (e.g. 0,1,2), not {args.seeds!r}.')
  return args


def pooled(args) -> bool:
  """Several seeds: one run per seed, the table over seeds by ``experiments.report``."""
  return len(args.seeds) > 1


def shrink(c, dataset: str, args, full_hebbian: bool = False) -> None:
  """The budget of this benchmark applied to a full config (``full_hebbian``: all of the
  recipe's unsupervised epochs, then the budget's probe)."""
  c.data.update({'name': dataset, 'data_dir': args.data_dir, 'download': False,
                 'eval_split': f'test[:{args.eval_examples}]'})
  c.model.kwargs.width = args.width
  c.batch_size, c.eval_batch_size = BATCH, 500
  c.num_train_steps = args.steps
  c.eval_every_steps = c.checkpoint_every_steps = 10 * args.steps      # once, at the end
  c.log_every_steps = 10
  c.compilation_cache_dir = None
  if c.method == 'hebbian':
    images = args.steps * BATCH // 2
    c.hebbian.num_steps = images // c.hebbian.batch_size
    if full_hebbian:
      c.hebbian.num_steps = int(c.hebbian.epochs * (data_lib.info(c.data).num_train // c.hebbian.batch_size))
    c.num_train_steps = c.hebbian.num_steps + args.steps // 2
  if c.optimizer.name == 'momentum_sgd' and c.optimizer.warmup_steps:
    c.optimizer.warmup_steps = args.steps // 10


class _Clock(metrics_lib.Progress):
  """Progress that records ``(time, step, images per step, phase)`` at every log instead of printing."""
  marks: list = []

  def log(self, step, scalars):
    _Clock.marks.append((time.perf_counter(), step, self.batch, int(scalars.get('phase', 0))))


def images_per_second(marks) -> dict:
  """Per phase (0: a one-phase run; 1, 2: Hebbian phase, probe): images over seconds between
  consecutive logs, leaving out each phase's first interval (it holds the step's compilation)."""
  totals, previous = {}, None
  for (t0, s0, b0, p0), (t1, s1, b1, p1) in zip(marks, marks[1:]):
    first_of_phase = p0 != previous
    previous = p0
    if p0 == p1 and b0 == b1 and s1 > s0 and not first_of_phase:
      images, seconds = totals.get(p1, (0, 0.0))
      totals[p1] = (images + (s1 - s0) * b1, seconds + t1 - t0)
  return {phase: images / seconds for phase, (images, seconds) in totals.items() if seconds > 0}


def run_row(name: str, dataset: str, args, seed: int = 0) -> dict:
  arch, method, label, build = ROWS[name]
  config = build(dataset)
  shrink(config, dataset, args, full_hebbian=name in FULL_HEBBIAN_ROWS)
  config.seed = seed
  workdir = os.path.join(args.workdir, dataset, f'{name}_seed{seed}' if pooled(args) else name)
  shutil.rmtree(workdir, ignore_errors=True)
  _Clock.marks = []
  train.loop.Progress = _Clock
  start = time.perf_counter()
  try:
    final = train.train_and_evaluate(config, workdir)
  except train.NumericalError as error:          # a diverging row is a result too
    print(f'{name} on {dataset}: {error}', flush=True)
    final = {'eval/top1': float('nan')}
  wall = time.perf_counter() - start
  rates = images_per_second(_Clock.marks)
  hebbian = config.method == 'hebbian'
  row = {
      'name': name, 'dataset': dataset, 'seed': seed, 'arch': arch, 'label': label, 'method': config.method,
      'top1': 100 * final['eval/top1'], 'paper': common.PAPER.get((dataset, arch, method)),
      'steps': config.num_train_steps, 'hebbian_steps': config.hebbian.num_steps if hebbian else 0,
      'images_per_s': rates.get(2 if hebbian else 0),
      'hebbian_images_per_s': rates.get(1) if hebbian else None,
      'wall_s': wall, 'workdir': workdir,
  }
  print(json.dumps(row), flush=True)
  return row


def plot_row_fields(row: dict, figures: str) -> str:
  kernel = plots.latest_params(row['workdir'])['conv1']['kernel']
  os.makedirs(figures, exist_ok=True)
  out = os.path.join(figures, f"baselines_fields_{row['dataset']}_{row['name']}.png")
  return plots.plot_fields(kernel, out, f"conv1 after {row['label']} ({row['arch']}, {row['dataset']})")


def _rate(value) -> str:
  return '–' if value is None else f'{value:,.0f}'


def table(rows: list, args) -> str:
  """Markdown table of the rows, the paper's full-budget number beside the rows it reports."""
  lines = ['| dataset | arch | method | test top-1 (%) | paper, full budget (%) | train img/s '
           '(Hebbian phase / probe or BP) |', '|---|---|---|---|---|---|']
  for r in rows:
    paper = '–' if r['paper'] is None else f"{r['paper']:.2f}"
    speed = (f"{_rate(r['hebbian_images_per_s'])} / {_rate(r['images_per_s'])}" if r['method'] == 'hebbian'
             else _rate(r['images_per_s']))
    top1 = f"{r['top1']:.2f}" if r['top1'] == r['top1'] else 'diverged (NaN)'
    lines.append(f"| {r['dataset']} | {r['arch']} | {r['label']} | {top1} | {paper} | {speed} |")
  return '\n'.join(lines)


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  return f'{jax.devices()[0].platform.upper()} ({cpu}, {os.cpu_count()} cores, shared)'


def section(rows: list, args, figures: list) -> str:
  machine = _machine()
  off_budget = any(r['name'] in FULL_HEBBIAN_ROWS for r in rows)
  budget = (f'width {args.width}, {args.steps} steps × {BATCH} images per run (Hebbian baselines: half '
            f'of the images in the unsupervised phase at their own batch size, half in the probe), '
            f'test top-1 on the first {args.eval_examples} test images')
  body = [HEADING, '',
          f'`python -m benchmarks.baselines` on {machine}, {budget}. Every row is the recipe of its '
          'config file in `experiments/configs/` with that budget; the paper\'s numbers are for the full '
          'recipes (100 epochs, full width) and are shown only as the target.' + (
              ' The row "SoftHebb, full Hebbian epoch" is off budget: SoftHebb\'s whole unsupervised '
              'epoch (batch 10), then the budget\'s probe.' if off_budget else ''), '',
          table(rows, args), '']
  if figures:
    body += ['First-layer receptive fields: ' + ', '.join(
        f'[{os.path.basename(f)}](figures/{os.path.basename(f)})' for f in figures), '']
  return '\n'.join(body)


def pooled_section(rows: list, args) -> str:
  """The rows' workdirs tabulated by ``experiments.report`` (seeds pooled: mean ± std)."""
  from experiments import report  # pylint: disable=import-outside-toplevel
  runs = [report.load(r['workdir']) for r in rows]
  seeds = ','.join(map(str, args.seeds))
  return '\n'.join([
      POOLED_HEADING, '',
      f'`python -m benchmarks.baselines --datasets {args.datasets} --rows {args.rows} --seeds {seeds}` on '
      f'{_machine()}: the budget of the section above '
      f'(width {args.width}, {args.steps} steps × {BATCH} images, test top-1 on the first '
      f'{args.eval_examples} test images), one run per seed, tabulated by `python -m experiments.report '
      'WORKDIR... --markdown` (one evaluation at the end, so last = best).', '',
      report.table(report.summarize(runs), markdown=True), ''])


def write_section(path: str, text: str, heading: str = HEADING) -> None:
  """Replaces (or appends) the section ``heading`` of ``path``, leaving the others untouched."""
  old = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
  pattern = re.compile(rf'^{re.escape(heading)}\n.*?(?=^## |\Z)', re.S | re.M)
  if pattern.search(old):
    new = pattern.sub(lambda _: text + '\n', old)
  else:
    new = old.rstrip('\n') + '\n\n' + text + '\n'
  with open(path, 'w') as f:
    f.write(new)


def _previous_rows(args) -> dict:
  """``{(dataset, name, seed): row}`` of ``--out`` if it was written with the same budget."""
  if not os.path.exists(args.out):
    return {}
  with open(args.out) as f:
    previous = json.load(f)
  budget = ('steps', 'width', 'eval_examples')
  if any(previous['args'].get(k) != getattr(args, k) for k in budget):
    return {}
  return {(r['dataset'], r['name'], r.get('seed', 0)): r for r in previous['rows']}


def main(argv=None):
  args = parse_args(argv)
  chosen = [r for r in filter(None, args.rows.split(','))] or list(ROWS)
  ablation_sets = set(args.ablations_on.split(','))
  rows, figures = [], []
  done = _previous_rows(args) if args.reuse else {}
  for dataset in args.datasets.split(','):
    for name in chosen:
      if name in ABLATION_ROWS + FULL_HEBBIAN_ROWS and dataset not in ablation_sets:
        continue
      for seed in args.seeds:
        row = done.get((dataset, name, seed)) or run_row(name, dataset, args, seed)
        rows.append(row)
        if not pooled(args) and name in FIELD_ROWS and row['top1'] == row['top1']:
          figures.append(plot_row_fields(row, args.figures))
        with open(args.out, 'w') as f:
          json.dump({'args': vars(args), 'rows': rows}, f, indent=1)
  text = pooled_section(rows, args) if pooled(args) else section(rows, args, figures)
  print(text)
  if args.results:
    write_section(args.results, text, POOLED_HEADING if pooled(args) else HEADING)


if __name__ == '__main__':
  main()
