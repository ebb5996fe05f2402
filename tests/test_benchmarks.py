"""The benchmark scripts run end to end at tiny sizes, and count FLOPs as the model says."""
import json
import math
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the benchmarks/ scripts
from benchmarks import accelerator, input_rate, memory, step_time  # noqa: E402
from ghl_jax.train import data as data_lib  # noqa: E402
from ghl_jax import models  # noqa: E402


def deephebb_forward_flops(width: float, batch: int) -> dict:
  """By hand: 2·sites·fan_in·features per layer of DeepHebb on 32×32 inputs."""
  c1, c2, c3 = (max(1, round(c * width)) for c in (96, 384, 1536))
  return {'conv1': 2 * batch * 32 * 32 * c1 * 5 * 5 * 3,
          'conv2': 2 * batch * 16 * 16 * c2 * 3 * 3 * c1,
          'conv3': 2 * batch * 8 * 8 * c3 * 3 * 3 * c2,
          'classifier': 2 * batch * 10 * 4 * 4 * c3}


def test_model_flops_of_deephebb():
  width, batch = 0.0625, 3
  model = models.DeepHebb(width=width)
  flops = step_time.model_flops(model, {'image': jnp.zeros((batch, 32, 32, 3))})
  layers = deephebb_forward_flops(width, batch)
  forward = sum(layers.values())
  convs = layers['conv1'] + layers['conv2'] + layers['conv3']
  backprop = 3 * forward - layers['conv1']          # no input gradient for the first layer
  assert flops == {'forward': forward, 'BP': backprop, 'GHL': backprop + convs}


def test_step_time_runs_and_reports(tmp_path):
  out = tmp_path / 'step_time.json'
  step_time.main(['--width', '0.0625', '--batch', '4', '--steps', '2', '--warmup', '0',
                  '--matmul-size', '128', '--json', str(out)])
  report = json.loads(out.read_text())
  assert [r['variant'] for r in report['rows']] == ['GHL', 'BP']
  for row in report['rows']:
    assert row['median_s'] > 0 and math.isfinite(row['loss'])
    assert 0 < row['fraction_of_peak'] < 10
  assert report['rows'][0]['model_flops'] > report['rows'][1]['model_flops']


def test_step_time_rejects_unknown_variant():
  with pytest.raises(SystemExit):
    step_time.parse_args(['--variants', 'GHL,warp drive'])


def test_memory_compiles_both_modes():
  rows = [memory.compile_step('deephebb', 2, ghl, 'auto') for ghl in (False, True)]
  assert [r['mode'] for r in rows] == ['BP', 'GHL']
  for r in rows:
    assert r['peak'] == r['arguments'] + r['outputs'] - r['aliased'] + r['temporaries'] > 0
  assert '| deephebb | 2 |' in memory.table(rows)


def test_input_pipeline_rate(tiny_tfds):
  data_dir, name = tiny_tfds
  cfg = data_lib.default_config(name)
  cfg.data_dir = data_dir
  rate = input_rate.pipeline_rate(cfg, batch=8, count=5)
  assert rate['batches_per_s'] > 0 and rate['image_shape'] == (32, 32, 3)


def test_accelerator_tiny_runs_every_model_dtype_and_mode(tmp_path, capsys):
  """The accelerator benchmark's --tiny mode: the full table at tiny shapes, on CPU, with the
  convolutions accelerators run (conv_impl 'xla': XLA's convs, Hebbian terms by their vjp)."""
  out = tmp_path / 'accelerator.json'
  accelerator.main(['--tiny', '--conv-impl', 'xla', '--json', str(out)])
  report = json.loads(out.read_text())
  got = [(r['model'], r['dtype'], r['mode']) for r in report['rows']]
  assert got == [(m, d, mode) for m in ('deephebb', 'resnet50') for d in ('float32', 'bfloat16')
                 for mode in ('GHL', 'BP')]
  for r in report['rows']:
    assert r['median_s'] > 0 and math.isfinite(r['loss']) and r['xla_peak_bytes'] > 0
  assert report['peaks']['bfloat16'] > 0 and not report['skipped']
  assert '| resnet50 | bfloat16 | GHL |' in capsys.readouterr().out


def test_accelerator_refuses_full_size_on_cpu():
  assert jax.default_backend() == 'cpu'
  with pytest.raises(SystemExit, match='no GPU/TPU'):
    accelerator.main(['--models', 'deephebb', '--dtypes', 'float32'])


def _cifar10_npz(folder, train: int, test: int):
  """A CIFAR-10 folder in the shared copy's format (test sorted by class), random pixels."""
  rng = np.random.default_rng(0)
  folder.mkdir()
  np.savez(folder / 'train-00000-of-00001.npz', image=rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
           label=rng.integers(0, 10, train))
  np.savez(folder / 'test.npz', image=rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
           label=np.sort(rng.integers(0, 10, test)))
  return str(folder)


def test_paper_run_epoch_is_the_trainer_step_over_a_permutation(tmp_path):
  """One jitted epoch (scan + on-device gather) gives the params of the trainer's own step run
  batch by batch over the same permutation."""
  from benchmarks import paper_run  # pylint: disable=import-outside-toplevel
  args = paper_run.parse_args(['--tiny', '--data', _cifar10_npz(tmp_path / 'npz', 128, 40)])
  data = paper_run.load(args)
  run = paper_run.Run('ghl', args, data)
  state = jax.tree.map(jnp.copy, run.state)
  run.train_epoch(data, args.seed)
  images, labels = data['train']
  order = jax.random.permutation(jax.random.fold_in(jax.random.key(args.seed), 0), 128).reshape(2, 64)
  step = jax.jit(run.step_fn)
  for idx in order:
    state, _ = step(state, {'image': images[idx].astype(jnp.float32) / 127.5 - 1, 'label': labels[idx]})
  chex.assert_trees_all_close(run.state['params'], state['params'], rtol=1e-4, atol=1e-6)
  assert run.epochs == 1 and run.per_epoch == 2 and math.isfinite(run.loss)
  test_images, test_labels = data['test']                # 40 images: one padded, masked chunk
  logits = run.model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                           test_images.astype(jnp.float32) / 127.5 - 1, train=False)
  hits = np.asarray(jnp.argmax(logits, -1) == test_labels)
  assert run.top1(data) == pytest.approx(100 * hits.mean(), abs=1e-4)


def test_paper_run_tiny_stops_at_its_budget_and_reports_both(tmp_path, capsys):
  from benchmarks import paper_run  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'paper_run.json'
  result = paper_run.main(['--tiny', '--data', _cifar10_npz(tmp_path / 'npz', 128, 40), '--epochs', '3',
                           '--budget-s', '1e-6', '--json', str(out)])
  assert json.loads(out.read_text())['gap'] == result['gap']
  rows = {r['method']: r for r in result['rows']}
  assert set(rows) == {'ghl', 'bp'} and result['stopped_at_budget']
  for r in rows.values():                       # one epoch, then the stop: evaluated where it stopped
    assert r['epochs'] == 1 and r['curve'] == [(1, r['top1'])] and 0 <= r['top1'] <= 100
    assert r['step_ms'] > 0
  assert result['gap'] == rows['ghl']['top1'] - rows['bp']['top1']
  assert 'stopped at the wall-clock budget' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='no GPU/TPU'):
    paper_run.main(['--data', str(tmp_path / 'npz')])
  with pytest.raises(SystemExit, match='CIFAR10_NPZ'):
    paper_run.main(['--tiny', '--data', str(tmp_path / 'missing')])


def test_epoch_share_times_every_phase_and_evaluates_every_test_image(tiny_tfds, monkeypatch, tmp_path):
  """SoftHebb's config has two phases (unsupervised at its own batch, then the probe): a row each,
  shares computed from the measured times; the eval pass sees all 40 test images."""
  from benchmarks import epoch_share  # pylint: disable=import-outside-toplevel
  data_dir, name = tiny_tfds

  real = epoch_share.load_config

  def tiny(config_name, _):
    config = real(config_name, data_dir)
    config.data.update({'name': name})
    config.model.kwargs.width = 1 / 16
    config.batch_size, config.eval_batch_size = 16, 16
    config.hebbian.batch_size = 8
    return config
  monkeypatch.setattr(epoch_share, 'load_config', tiny)
  rows = epoch_share.main(['--configs', 'cifar10_deephebb_softhebb', '--steps', '1', '--batches', '2',
                           '--out', str(tmp_path / 'share.json'), '--results', ''])
  assert [(r['phase'], r['batch'], r['steps_per_epoch']) for r in rows] == [('hebbian', 8, 12), ('probe', 16, 6)]
  for r in rows:
    assert r['eval_examples'] == 40 and 0 <= r['eval_top1'] <= 1 and r['eval_first_s'] > 0
    assert r['train_epoch_s'] == pytest.approx(r['steps_per_epoch'] * r['step_s'])
    assert r['eval_share'] == pytest.approx(r['eval_s'] / r['train_epoch_s'])
    assert r['input_share'] == pytest.approx(r['input_epoch_s'] / r['train_epoch_s'])
  text = epoch_share.section(rows, epoch_share.parse_args([]))
  assert '| cifar10_deephebb_softhebb | probe | 16 |' in text and '| none in this phase |' in text


def test_user_loop_runs_and_checks_its_goals(tmp_path):
  from benchmarks import user_loop  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'user_loop.json'
  reports = user_loop.main(['--cases', 'deephebb', '--width', '0.0625', '--steps', '1', '--warmup', '0',
                            '--matmul-size', '128', '--json', str(out)])
  rows = {r['variant']: r for r in reports['deephebb']['rows']}
  assert set(rows) == set(user_loop.VARIANTS)
  for row in rows.values():
    assert row['median_s'] > 0 and math.isfinite(row['loss'])
  lines = user_loop.goals(reports['deephebb'])
  assert len(lines) == 4 and all(('met' in line) or ('x' in line) for line in lines)
  assert json.loads(out.read_text())['deephebb']['batch'] == 64


def test_accumulation_compiles_both_forms():
  from benchmarks import accumulation  # pylint: disable=import-outside-toplevel
  rows = accumulation.main(['--micro', '1,2', '--width', '0.0625', '--batch', '4'])
  assert sorted(rows) == ['gemm', 'xla'] and all(len(v) == 2 and min(v) > 0 for v in rows.values())


def test_horizon_table_counts_epochs_gaps_and_pace(tmp_path):
  """Two runs' rows by hand: the gap per epoch, images/s as the median logged interval, and a
  stopped stretch (> gap_s) left out of the training time."""
  from benchmarks import horizon_table  # pylint: disable=import-outside-toplevel
  for name, top1, align in (('ghl', (0.50, 0.60), 'cos_update'), ('bp', (0.55, 0.58), 'cos_magnitude')):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps({'batch_size': 10}))
    rows = [{'step': 5, 'time': 0.0, 'loss': 1.0, f'align/conv1/{align}': 0.2},
            {'step': 10, 'time': 5.0, 'loss': 0.9, f'align/conv1/{align}': 0.4},
            {'step': 10, 'time': 6.0, 'eval/top1': top1[0]},
            {'step': 15, 'time': 5000.0, 'loss': 0.8},                  # resumed after a long stop
            {'step': 20, 'time': 5010.0, 'loss': 0.7},
            {'step': 20, 'time': 5011.0, 'eval/top1': top1[1]}]
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  text = horizon_table.tables(str(tmp_path), gap_s=900)
  assert '| 1 | 10 | 50.00 | 55.00 | -5.00 |' in text and '| 2 | 20 | 60.00 | 58.00 | +2.00 |' in text
  assert '| GHL | 7.5 | 0.00 | 4 |' in text     # median of 50/5 and 50/10 img/s; the 4990 s stop left out
  assert '| GHL | conv1 | 0.30 (0.20 → 0.40) | — |' in text and '| BP (shadow) | conv1 | — | 0.30' in text
