"""The benchmark scripts run end to end at tiny sizes, and count FLOPs as the model says."""
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
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
