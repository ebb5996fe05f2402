"""experiments.report over fabricated workdirs (seeds pooled, mean ± std against numpy, markdown,
plot, one-line errors) and launch/sweep.py --seeds."""
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from experiments import report
from experiments.configs import baselines
from experiments.configs import recipes
from ghl_jax.train import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
LOGS = (5, 10, 15, 20, 25, 30)        # a train row every 5 steps, 0.5 s apart: 5 · 64 / 0.5 = 640 img/s
EVALS = (15, 25, 30)                  # each takes 7 s, left out of images/s
RATE = '640'


def fabricate(workdir, config, top1, *, hebbian_stats=True):
  """A run's workdir: ``metrics.jsonl`` and ``config.json`` (``config`` None: ``run.json`` instead)."""
  os.makedirs(workdir)
  rows, time = [], 1000.0
  for step in LOGS:
    time += 0.5
    rows.append({'step': step, 'time': time, 'loss': 1.0, 'accuracy': 0.5,
                 **({'hebb/conv1/max_abs': 1.0, 'align/conv1/cos_update': 0.1 * step / 30,
                     'align/conv1/near_zero': 0.2} if hebbian_stats else {})})
    if step in EVALS:
      time += 7.0
      rows.append({'step': step, 'time': time, 'eval/loss': 1.0, 'eval/top1': float(top1[EVALS.index(step)])})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if config is not None:
    run_config.save(config, str(workdir))
  else:                                          # a workdir of before config.json: the identity only
    with open(os.path.join(workdir, 'run.json'), 'w') as f:
      json.dump({'model.name': 'deephebb', 'data.name': 'cifar10'}, f)
  return str(workdir)


def seeded(build, seed):
  c = build()
  c.seed = seed
  c.data.data_dir = f'/data/copy{seed}'        # where a run reads: not part of its group
  return c


GROUPS = {'GHL': lambda: recipes.cifar('cifar10', 'deephebb', 'ghl'),
          'GHL ablation: signsgd': lambda: baselines.ghl_ablation('signsgd')}


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """2 groups × 3 seeds, interleaved: (workdirs, {label: top-1 array [seed, eval]})."""
  root = tmp_path_factory.mktemp('runs')
  rng = np.random.default_rng(0)
  top1 = {label: rng.uniform(0.2, 0.6, (len(SEEDS), len(EVALS))) for label in GROUPS}
  workdirs = [fabricate(root / f'{i}_seed{seed}', seeded(build, seed), top1[label][seed])
              for seed in SEEDS for i, (label, build) in enumerate(GROUPS.items())]
  return workdirs, top1


def run_main(argv, capsys):
  try:
    code = report.main(argv)
  except SystemExit as exit_:
    code = exit_.code
  out, err = capsys.readouterr()
  return code, out, err


def expected(values):
  return f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}'


def test_groups_pool_seeds_mean_std_against_numpy(sweep):
  workdirs, top1 = sweep
  rows = report.summarize([report.load(w) for w in workdirs])
  assert [r.label for r in rows] == list(GROUPS)
  for row, paper in zip(rows, ('86.41', '–')):
    percent = 100 * top1[row.label]
    np.testing.assert_allclose(row.last, percent[:, -1])
    np.testing.assert_allclose(row.best, percent.max(axis=1))
    assert report.cells(row) == (row.label, 'deephebb', 'cifar10', '30', '3', expected(percent[:, -1]),
                                 expected(percent.max(axis=1)), RATE, paper)


def test_plain_table_and_plot(sweep, capsys, tmp_path):
  workdirs, _ = sweep
  png = tmp_path / 'curves.png'
  code, out, err = run_main(workdirs + ['--plot', str(png)], capsys)
  assert code == 0, err
  lines = out.splitlines()
  assert lines[0].split()[:2] == ['method', 'model'] and set(lines[1]) == {'-', ' '} and len(lines) == 4
  assert lines[2].startswith('GHL ') and lines[3].startswith('GHL ablation: signsgd')
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plot_draws_the_logged_gradient_alignment(sweep):
  workdirs, _ = sweep
  rows = report.summarize([report.load(w) for w in workdirs])
  assert report.alignment_layers(rows) == ['conv1']
  curve = report.alignment_curve('conv1', 'cos_update')(rows[0].runs[0].rows)
  assert [step for step, _ in curve] == list(LOGS) and curve[-1][1] == 0.1


def test_markdown_labels_differences_and_paper_only_for_its_recipe(tmp_path, capsys):
  def lr_conv(value):
    c = recipes.cifar('cifar10', 'deephebb', 'ghl')
    c.optimizer.lr_conv = value
    return c
  builds = [lambda: lr_conv(1e-2), lambda: lr_conv(2e-2), lambda: recipes.cifar('cifar10', 'deephebb', 'bp'),
            lambda: baselines.cifar_bp_strong('cifar10', 'deephebb')]
  workdirs = [fabricate(tmp_path / f'run{i}', build(), [0.1, 0.2, 0.3]) for i, build in enumerate(builds)]
  code, out, _ = run_main(workdirs + ['--markdown'], capsys)
  assert code == 0
  lines = out.splitlines()
  assert len(lines) == 6 and all(line.startswith('|') and line.endswith('|') for line in lines)
  assert lines[1] == '|' + '---|' * len(report.HEADER)
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
  assert [c[0] for c in cells[:2]] == ['GHL (lr_conv=0.01)', 'GHL (lr_conv=0.02)']
  assert cells[2][0].startswith('BP (') and 'name=paper_sgd' in cells[2][0]
  assert 'name=momentum_sgd' in cells[3][0]
  assert [c[-1] for c in cells] == ['86.41', '86.41', '86.98', '–']      # Nesterov: not the paper's BP
  assert all(c[4] == '1' and c[5] == '30.00' and c[6] == '30.00' for c in cells)


def test_without_config_json_the_workdir_name_groups(tmp_path):
  workdirs = [fabricate(tmp_path / name, None, [0.1, 0.2, 0.3 + i / 10])
              for i, name in enumerate(('lr=1_seed0', 'lr=1_seed1', 'lr=2_seed0'))]
  workdirs.append(fabricate(tmp_path / 'bp_seed0', None, [0.1, 0.2, 0.3], hebbian_stats=False))
  rows = report.summarize([report.load(w) for w in workdirs])
  assert [(r.label, len(r.runs)) for r in rows] == [('GHL (lr=1)', 2), ('GHL (lr=2)', 1), ('BP (bp)', 1)]
  assert report.cells(rows[0])[5:] == (expected([30.0, 40.0]), expected([30.0, 40.0]), '–', '86.41')


def test_bad_input_is_one_line(tmp_path, capsys):
  empty, blank = tmp_path / 'empty', tmp_path / 'blank'
  empty.mkdir()
  blank.mkdir()
  (blank / 'metrics.jsonl').write_text('')
  cases = {str(tmp_path / 'missing'): 'no such directory', str(empty): 'no metrics.jsonl',
           str(blank): 'no rows'}
  for workdir, reason in cases.items():
    code, out, err = run_main([workdir], capsys)
    assert code == 2 and not out and err.count('\n') == 1 and err.startswith('error: ') and reason in err
  code, _, err = run_main([], capsys)
  assert code == 2 and err.count('\n') == 1 and 'WORKDIR' in err


def test_sweep_seeds_dry_run(tmp_path):
  config = 'experiments/configs/cifar10_deephebb_ablations.py'
  result = subprocess.run([sys.executable, 'launch/sweep.py', config, f'--workdir_root={tmp_path}',
                           '--seeds=0,1,2', '--dry_run'], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [line for line in result.stdout.splitlines() if 'experiments.main' in line]
  entries = [{}] + [{field: value} for field, value in baselines.ABLATIONS.values()]
  assert len(lines) == len(entries) * len(SEEDS)
  for line, (entry, seed) in zip(lines, [(e, s) for e in entries for s in SEEDS]):
    workdir = next(a for a in shlex.split(line) if a.startswith('--workdir='))
    assert line.endswith(f'--config.seed={seed}') and workdir.endswith(f'seed{seed}')
    assert os.path.basename(workdir) == '_'.join(
        [f'{f.split(".")[-1]}={v}' for f, v in entry.items()] + [f'seed{seed}'])
  assert not os.listdir(tmp_path)


def test_a_real_run(tiny_tfds, tmp_path, capsys):
  """A 4-step GHL run of the trainer, evaluated twice, then reported."""
  from ghl_jax import train  # pylint: disable=import-outside-toplevel
  c = recipes.cifar('cifar10', 'deephebb', 'ghl')
  c.model.kwargs.width = 0.05
  c.data.update({'name': tiny_tfds[1], 'data_dir': tiny_tfds[0]})
  c.batch_size, c.eval_batch_size, c.num_train_steps = 16, 40, 4
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 2, 4
  c.compilation_cache_dir = os.path.join(tempfile.gettempdir(), 'ghl_jax_test_xla_cache')
  final = train.train_and_evaluate(c, str(tmp_path / 'seed0'))
  capsys.readouterr()
  code, out, err = run_main([str(tmp_path / 'seed0'), '--plot', str(tmp_path / 'curves.png')], capsys)
  assert code == 0, err
  row = out.splitlines()[2]
  assert row.startswith('GHL') and f'deephebb  {tiny_tfds[1]}' in row
  assert row.split()[-6:-3] == ['4', '1', f"{100 * final['eval/top1']:.2f}"]        # steps, seeds, last
  assert (tmp_path / 'curves.png').exists()
