"""Tabulates runs, seeds pooled, beside the paper's numbers.

    python -m experiments.report WORKDIR... [--markdown] [--plot FILE]

Runs whose configs differ only in the seed (and in ``IGNORED``: where a run reads and writes, how
often it logs and saves) form one group, one row each: method (with what sets the group apart from
its peers), model, dataset, steps, seeds, last and best test top-1 as mean ± std over the seeds that
have evaluated (sample std, ddof = 1), training images/s and the paper's number (``common.PAPER``)
where the group is the paper's row (no ablation, the recipe's optimizer and rule). ``--plot``
writes the test top-1 curves: each group's mean with a ±std band.

A run's config is ``WORKDIR/config.json`` (the resolved config) when present; else its identity
(``run.json``), the method read off the metrics (phases: hebbian, Hebbian statistics: ghl, else
bp) and the workdir's name without its ``seed{N}`` suffix.

Images/s: the median over the log intervals of a run's last phase of ``Δstep · batch / Δtime``
(row timestamps; the phase's first interval and those holding an evaluation left out), averaged
over the seeds; '–' without the batch size (no config.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Optional

from etils import epath
import numpy as np

from experiments.configs import baselines
from experiments.configs import common
from experiments.configs import recipes

IGNORED = ('seed', 'data.data_dir', 'data.manual_dir', 'data.download', 'compilation_cache_dir', 'force',
           'sweep', 'keep_checkpoints', 'checkpoint_every_steps', 'log_every_steps', 'eval_batch_size',
           'profile_steps')
COLUMNS = ('method', 'model.name', 'data.name', 'num_train_steps', 'num_epochs')   # never in labels
RECIPE_FIELDS = ('optimizer.name', 'optimizer.nesterov', 'ghl.direction', 'ghl.magnitude', 'ghl.rule',
                 'hebbian.rule')
METHOD_NAMES = {'ghl': 'GHL', 'bp': 'BP', 'softhebb': 'SoftHebb', 'swta': 'SWTA', 'hpca': 'HPCA',
                'hebbian': 'Hebbian + probe'}
ARCH = {'deephebb_softhebb': 'deephebb'}   # the paper's architecture of a model variant
SEED_SUFFIX = re.compile(r'(?:^|_)seed(\d+)$')
MAX_NOTES = 3
DASH = '–'
HEADER = ('method', 'model', 'dataset', 'steps', 'seeds', 'last top-1 (%)', 'best top-1 (%)', 'img/s',
          'paper (%)')


class ReportError(Exception):
  """Bad input: reported as one line."""


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict          # flat: dotted field -> value
  rows: list
  complete: bool        # config from config.json (else identity, method and workdir name)


@dataclasses.dataclass
class Row:
  label: str
  model: str
  dataset: str
  runs: list
  steps: list           # last logged step of each run
  last: list            # test top-1 (%) at each run's last evaluation
  best: list            # best test top-1 (%) of each run
  rate: Optional[float]
  paper: Optional[float]


def _canon(value) -> str:
  return json.dumps(value, sort_keys=True, default=str)


def method_from_metrics(rows: list) -> str:
  keys = set().union(*rows)
  if 'phase' in keys:
    return 'hebbian'
  return 'ghl' if any(k.startswith('hebb/') for k in keys) else 'bp'


def check(workdir: str) -> None:
  """Refuses a path that is no run's workdir (before the trainer's modules are imported)."""
  try:                                         # a local folder or a bucket URL (gs://, s3://)
    found, logged = epath.Path(workdir).is_dir(), (epath.Path(workdir) / 'metrics.jsonl').exists()
  except Exception as error:  # pylint: disable=broad-except  # no gcsfs / s3fs, or the store's own error
    raise ReportError(f'{workdir}: cannot read it ({type(error).__name__}: {error}); a gs:// or s3:// '
                      'workdir needs gcsfs or s3fs and this host\'s credentials.') from None
  if not found:
    raise ReportError(f'{workdir}: no such directory; pass run workdirs (e.g. workdirs/CONFIG/*).')
  if not logged:
    raise ReportError(f'{workdir} has no metrics.jsonl: pass the workdir of a run that has logged.')


def load(workdir: str) -> Run:
  """The config and metric rows of one run's workdir."""
  check(workdir)
  # pylint: disable=import-outside-toplevel
  from ghl_jax.train import metrics, run_config     # the trainer package: seconds to import
  from ghl_jax.train.validate import ConfigError
  try:
    rows = metrics.read(workdir)
  except (OSError, KeyError, TypeError) as error:
    raise ReportError(f'{workdir}/metrics.jsonl is unreadable ({error!r}): leave that run out.') from None
  try:
    config = run_config.read(workdir) or {}
  except ConfigError:
    raise ReportError(f'{workdir}: its {run_config.FILENAME} or {run_config.LEGACY_FILENAME} is unreadable: '
                      'repair it or leave that run out.') from None
  if not rows:
    raise ReportError(f'{workdir}/metrics.jsonl has no rows yet: leave that run out until it logs.')
  if (epath.Path(workdir) / run_config.FILENAME).exists():
    return Run(workdir, config, rows, complete=True)
  parent, name = os.path.split(os.path.abspath(workdir))
  seed = SEED_SUFFIX.search(name)
  name = name[:seed.start()] if seed else name
  config = {**config, 'method': method_from_metrics(rows), 'seed': int(seed.group(1)) if seed else None,
            'workdir': os.path.join(parent, name) if name else parent}
  return Run(workdir, config, rows, complete=False)


def group(runs: list) -> list:
  """Lists of runs whose configs agree on every field but ``IGNORED``, in order of appearance."""
  groups = {}
  for run in runs:
    key = _canon({k: v for k, v in run.config.items() if k not in IGNORED})
    groups.setdefault(key, []).append(run)
  return list(groups.values())


def method_key(config: dict) -> str:
  """The paper's name of the method: 'ghl', 'bp' or the Hebbian baseline's rule."""
  method = config.get('method', '?')
  return config.get('hebbian.rule', 'hebbian') if method == 'hebbian' else method


def ablations(config: dict) -> list:
  if config.get('method') != 'ghl':
    return []
  return [name for name, (field, value) in baselines.ABLATIONS.items()
          if field in config and config[field] == value]


def method_name(config: dict) -> str:
  key = method_key(config)
  name = METHOD_NAMES.get(key, f'Hebbian ({key})' if config.get('method') == 'hebbian' else key)
  found = ablations(config)
  return f'{name} ablation: {"+".join(found)}' if found else name


def _recipe(dataset: str, arch: str, key: str):
  """The project's config of the paper's row (dataset, architecture, method key)."""
  imagenet = dataset == 'imagenet2012'
  if key in ('ghl', 'bp'):
    return recipes.imagenet(arch, key) if imagenet else recipes.cifar(dataset, arch, key)
  if key == 'softhebb':
    return baselines.imagenet_softhebb() if imagenet else baselines.cifar_softhebb(dataset)
  return baselines.imagenet_fasthebb(key) if imagenet else baselines.cifar_fasthebb(dataset, key)


def paper(run: Run) -> Optional[float]:
  """The paper's test top-1 of the run's row; None off the paper's recipe (an ablation, another
  optimizer or rule: ``RECIPE_FIELDS``, checked when the whole config is known)."""
  config = run.config
  dataset, model, key = config.get('data.name'), config.get('model.name'), method_key(config)
  arch = ARCH.get(model, model)
  number = common.PAPER.get((dataset, arch, key))
  if number is None or ablations(config):
    return None
  if run.complete:
    from ghl_jax.train import run_config  # pylint: disable=import-outside-toplevel
    reference = run_config.flatten(_recipe(dataset, arch, key))
    if any(_canon(config.get(f)) != _canon(reference.get(f)) for f in RECIPE_FIELDS):
      return None
  return number


def _note(field: str, value, short: str) -> str:
  if field == 'workdir':
    return os.path.basename(value or DASH)
  return f'{short}={DASH if value is None else value}'


def _rank(field: str, method: str) -> tuple:
  """Sort key of a label's fields: the method's own section first, sections it does not read last."""
  order = {'ghl': ('ghl',), 'hebbian': ('hebbian',)}.get(method, ()) + ('optimizer', 'model', 'data')
  section = field.split('.', 1)[0]
  rank = order.index(section) if section in order else len(order) + (section in ('ghl', 'hebbian'))
  return rank, field


def labels(groups: list) -> list:
  """Method name, plus the fields in which a group differs from its peers (the groups of the same
  name, model and dataset whose configs come from the same kind of file); without config.json, the
  workdir's name."""
  heads = [(method_name(g[0].config), g[0].config.get('model.name'), g[0].config.get('data.name'),
            g[0].complete) for g in groups]
  out = []
  for runs, head in zip(groups, heads):
    peers = [g[0].config for g, h in zip(groups, heads) if h == head]
    fields = {f for c in peers for f in c} - set(IGNORED) - set(COLUMNS)
    fields = sorted((f for f in fields if len({_canon(c.get(f)) for c in peers}) > 1 or f == 'workdir'),
                    key=lambda f: _rank(f, runs[0].config.get('method')))
    tails = [f.rsplit('.', 1)[-1] for f in fields]
    notes = [_note(f, runs[0].config.get(f), t if tails.count(t) == 1 else f) for f, t in zip(fields, tails)]
    if len(notes) > MAX_NOTES:
      notes = notes[:MAX_NOTES] + [f'+{len(notes) - MAX_NOTES} more']
    out.append(f'{head[0]} ({", ".join(notes)})' if notes else head[0])
  return out


def curve(rows: list) -> list:
  """``[(step, test top-1 in %)]`` of a run's evaluations."""
  return [(r['step'], 100 * r['eval/top1']) for r in rows if 'eval/top1' in r]


def images_per_second(run: Run) -> Optional[float]:
  """Median of ``Δstep · batch / Δtime`` over the log intervals of the run's last phase."""
  batch = run.config.get('batch_size')
  train = [r for r in run.rows if 'eval/top1' not in r and 'time' in r]
  if not batch or not train:
    return None
  phase = max(r.get('phase', 0) for r in train)
  train = [r for r in train if r.get('phase', 0) == phase]
  evaluated = [r['step'] for r in run.rows if 'eval/top1' in r]
  rates = [(b['step'] - a['step']) * batch / (b['time'] - a['time'])
           for a, b in zip(train[1:], train[2:])          # the phase's first interval: compilation
           if b['time'] > a['time'] and not any(a['step'] <= s < b['step'] for s in evaluated)]
  return float(np.median(rates)) if rates else None


def summarize(runs: list) -> list:
  """One :class:`Row` per group of ``runs``."""
  groups = group(runs)
  rows = []
  for members, label in zip(groups, labels(groups)):
    curves = [c for c in (curve(r.rows) for r in members) if c]
    rates = [x for x in map(images_per_second, members) if x is not None]
    config = members[0].config
    rows.append(Row(label=label, model=config.get('model.name') or '?',
                    dataset=config.get('data.name') or '?', runs=members,
                    steps=[max(r['step'] for r in run.rows) for run in members],
                    last=[c[-1][1] for c in curves], best=[max(v for _, v in c) for c in curves],
                    rate=float(np.mean(rates)) if rates else None, paper=paper(members[0])))
  return rows


def mean_std(values: list) -> str:
  if not values:
    return DASH
  values = np.asarray(values, np.float64)
  if values.size == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def cells(row: Row) -> tuple:
  steps = str(row.steps[0]) if len(set(row.steps)) == 1 else f'{min(row.steps)}–{max(row.steps)}'
  return (row.label, row.model, row.dataset, steps, str(len(row.runs)), mean_std(row.last),
          mean_std(row.best), DASH if row.rate is None else f'{row.rate:,.0f}',
          DASH if row.paper is None else f'{row.paper:.2f}')


def table(rows: list, markdown: bool = False) -> str:
  body = [HEADER] + [cells(r) for r in rows]
  if markdown:
    lines = ['| ' + ' | '.join(text.replace('|', r'\|') for text in line) + ' |' for line in body]
    return '\n'.join(lines[:1] + ['|' + '---|' * len(HEADER)] + lines[1:])
  widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
  lines = ['  '.join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in body]
  return '\n'.join(lines[:1] + ['  '.join('-' * w for w in widths)] + lines[1:])


def loss_curve(rows: list) -> list:
  """``[(step, training loss)]`` of a run's logged training steps."""
  return [(r['step'], r['loss']) for r in rows if 'loss' in r and 'eval/top1' not in r]


def _bands(ax, rows: list, series, several: bool) -> int:
  """Each group's mean over its seeds of ``series(run.rows)`` with a ±std band, in the group's
  colour (its index in ``rows``); the number of groups drawn."""
  drawn = 0
  for index, row in enumerate(rows):
    at = {}
    for run in row.runs:
      for step, value in series(run.rows):
        at.setdefault(step, []).append(value)
    if not at:
      continue
    steps = np.array(sorted(at))
    mean = np.array([np.mean(at[s]) for s in steps])
    std = np.array([np.std(at[s], ddof=1) if len(at[s]) > 1 else 0.0 for s in steps])
    label = f'{row.label} · {row.model} · {row.dataset}' if several else row.label
    line, = ax.plot(steps, mean, marker='o' if len(steps) < 30 else None, markersize=3, color=f'C{index % 10}',
                    label=f'{label} (n={len(row.runs)})')
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    drawn += 1
  return drawn


ALIGNMENT = (('cos_update', 'cos(−update, G)'), ('cos_magnitude', 'cos(|Ĥ|, |G|)'),
             ('near_zero', 'share |Ĥ| < 1e-3'), ('top_overlap', 'top-10 % overlap |G|, |Ĥ|'))


def alignment_layers(rows: list) -> list:
  """The layers with gradient-alignment metrics (``align/<layer>/<measure>``) in any run, in order."""
  layers = {}
  for row in rows:
    for run in row.runs:
      for r in run.rows:
        for key in r:
          if key.startswith('align/'):
            layers.setdefault(key.split('/')[1], None)
  return list(layers)


def alignment_curve(layer: str, measure: str):
  """``rows -> [(step, value)]`` of one layer's alignment measure."""
  key = f'align/{layer}/{measure}'
  return lambda run_rows: [(r['step'], r[key]) for r in run_rows if key in r]


def _alignment_panels(axes, rows: list) -> None:
  """One panel per measure of :data:`ALIGNMENT`: each group's mean over its seeds, one line style
  a layer."""
  styles = ('-', '--', ':', '-.')
  for ax, (measure, title) in zip(axes, ALIGNMENT):
    for number, layer in enumerate(alignment_layers(rows)):
      for index, row in enumerate(rows):
        at = {}
        for run in row.runs:
          for step, value in alignment_curve(layer, measure)(run.rows):
            at.setdefault(step, []).append(value)
        if at:
          steps = sorted(at)
          ax.plot(steps, [np.mean(at[s]) for s in steps], styles[number % len(styles)], color=f'C{index % 10}',
                  label=f'{row.label} · {layer}')
    ax.set(xlabel='step', title=title)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize='x-small', loc='upper left', bbox_to_anchor=(1.02, 1.0))


def plot(rows: list, out: str) -> str:
  """Test top-1 and training loss over steps: each group's mean over its seeds with a ±std band;
  below them, where runs logged it, the gradient alignment of each governed layer
  (:mod:`ghl_jax.diagnostics`); as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  aligned = bool(alignment_layers(rows))
  fig = Figure(figsize=(13, 8.4) if aligned else (12, 4.2), layout='constrained')
  FigureCanvasAgg(fig)
  if aligned:
    grid = fig.add_gridspec(2, len(ALIGNMENT))
    top1 = fig.add_subplot(grid[0, :2])
    loss = fig.add_subplot(grid[0, 2:])
    _alignment_panels([fig.add_subplot(grid[1, i]) for i in range(len(ALIGNMENT))], rows)
  else:
    top1, loss = fig.subplots(1, 2)
  several = len({(r.model, r.dataset) for r in rows}) > 1
  if not _bands(top1, rows, curve, several):
    if not aligned:
      raise ReportError('no run has a test evaluation to plot: leave out --plot or wait for an eval.')
    top1.text(0.5, 0.5, 'no evaluation yet', ha='center', va='center', transform=top1.transAxes)
  _bands(loss, rows, loss_curve, several)
  top1.set(xlabel='step', ylabel='test top-1 (%)', title='Test top-1 (mean ± std over seeds)')
  loss.set(xlabel='step', ylabel='training loss (logged batches)', title='Training loss (mean ± std over seeds)')
  for ax in (top1, loss):
    ax.grid(alpha=0.3)
  loss.legend(*top1.get_legend_handles_labels(), fontsize='small', loc='upper left',   # one colour a group
              bbox_to_anchor=(1.02, 1.0))
  try:
    fig.savefig(out, dpi=120, bbox_inches='tight')
  except OSError as error:
    raise ReportError(f'cannot write {out} ({error.strerror}): pass --plot a writable path.') from None
  return out


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    self.exit(2, f'error: {message}; {" ".join(self.format_usage().split())}\n')


def main(argv=None) -> int:
  parser = _Parser(prog='python -m experiments.report', description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR', help='run workdirs (any order, seeds pooled)')
  parser.add_argument('--markdown', action='store_true', help='print a markdown table')
  parser.add_argument('--plot', metavar='FILE', help='write the test top-1, training loss and gradient-alignment curves to this PNG')
  args = parser.parse_args(argv)
  try:
    workdirs = list(dict.fromkeys(args.workdirs))
    for workdir in workdirs:
      check(workdir)
    rows = summarize([load(w) for w in workdirs])
    print(table(rows, args.markdown), flush=True)
    if args.plot:
      print(f'curves: {plot(rows, args.plot)}', file=sys.stderr)
  except ReportError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
