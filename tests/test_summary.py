"""What a run reports about itself: the model summary, TensorBoard's config and receptive fields,
profile traces, and the metrics of a finished workdir."""
import glob
import io
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs import common
from ghl_jax import train
from ghl_jax.train import events, metrics, summary
from ghl_jax.train.validate import ConfigError
from test_train import tiny_config


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Conv(4, (3, 3), padding='SAME', name='conv')(x), None


class Tiny(nn.Module):
  """8x8x3 → stem (stride 2) → BN → 3 scanned convs → grouped 1x1 conv → dense."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(4, (3, 3), strides=2, padding='SAME', name='stem')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    blocks = nn.scan(Block, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True},
                     length=3)
    x, _ = blocks(name='blocks')(x, None)
    x = nn.Conv(8, (1, 1), feature_group_count=2, name='grouped')(x)
    return nn.Dense(5, name='head')(x.reshape(x.shape[0], -1))


def test_summary_counts_params_and_flops_per_module():
  result = summary.summarize(Tiny(), jnp.zeros((1, 8, 8, 3)))
  # 2·|u|·fan_in per call: |u| outputs of one image, fan_in = window · C_in / groups.
  expected = [('stem', 3 * 3 * 3 * 4 + 4, 2 * 64 * 27), ('bn', 8, 0),
              ('blocks', 3 * (3 * 3 * 4 * 4 + 4), 3 * 2 * 64 * 36), ('grouped', 2 * 8 + 8, 2 * 128 * 2),
              ('head', 128 * 5 + 5, 2 * 5 * 128)]
  assert list(result.rows) == expected
  assert result.first_conv == ('stem',)
  lines = result.table().splitlines()
  assert lines[0].split() == ['module', 'params', 'FLOPs/image'] and lines[-1].split()[:2] == ['total', '1,233']
  params = {'stem': {'kernel': np.ones((3, 3, 3, 4))}}
  assert result.first_kernel(params).shape == (3, 3, 3, 4)


def tensorboard_values(directory) -> dict:
  """``{tag: last summary value}`` of the event files in ``directory``, read by TensorBoard's loader."""
  from tensorboard.backend.event_processing import event_file_loader
  values = {}
  for path in glob.glob(os.path.join(directory, 'events.*')):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        values[value.tag] = value
  return values


def test_writer_logs_config_and_receptive_fields(tmp_path):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  kernel = jax.device_put(np.random.default_rng(0).normal(size=(5, 5, 1, 6)), NamedSharding(mesh, P()))
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_config(common.base())
  writer.write_fields(3, kernel)
  writer.write_fields(3, np.zeros((4, 6)))            # not a conv kernel: nothing
  writer.close()
  values = tensorboard_values(tmp_path / 'tensorboard')
  assert {'config', 'receptive_fields', '_hparams_/session_start_info'} <= set(values)
  width, height = (int(s) for s in values['receptive_fields'].tensor.string_val[:2])
  assert min(width, height) >= 256
  assert b'batch_size' in values['config'].tensor.string_val[0]
  silent = metrics.MetricWriter(str(tmp_path / 'other'), enabled=False)
  silent.write_config(common.base())
  silent.write_fields(3, kernel)
  assert not os.path.exists(tmp_path / 'other')


def test_events_read_back_through_tensorboard(tmp_path):
  """Scalars, text, images and hparams written without TensorFlow read back by TensorBoard's own
  accumulator with the values written (the image pixel for pixel)."""
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  writer = events.SummaryWriter(str(tmp_path))
  for step, value in ((1, 0.5), (7, -2.25)):
    writer.scalar('train/loss', value, step)
  writer.text('note', 'hello', 3)
  writer.image('fields', image, 4)
  writer.image('gray', np.full((2, 3, 1), 0.5), 4)
  writer.hparams({'optimizer': {'lr': 0.01, 'name': 'sgd'}, 'layers': (1, 2)})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  acc.Reload()
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors('train/loss')]
  assert loss == [(1, 0.5), (7, -2.25)]
  assert acc.SummaryMetadata('train/loss').plugin_data.plugin_name == 'scalars'
  assert tensor_util.make_ndarray(acc.Tensors('note')[0].tensor_proto).item() == b'hello'
  width, height, encoded = tensor_util.make_ndarray(acc.Tensors('fields')[0].tensor_proto)
  assert (int(width), int(height)) == (7, 5)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), image)
  gray = tensor_util.make_ndarray(acc.Tensors('gray')[0].tensor_proto)[2]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(gray))), np.full((2, 3), 128))
  session = acc.summary_metadata['_hparams_/session_start_info'].plugin_data.content
  assert b'optimizer.lr' in session and b'optimizer.name' in session and b'(1, 2)' in session


@pytest.mark.parametrize('value, window', [
    (None, None), ('', None), ((), None), ('3,5', (3, 5)), ([2, 2], (2, 2)), ((4, 6), (4, 6)), (7, (7, 7)),
    (' 1 , 10', (1, 10))])
def test_profile_window(value, window):
  assert metrics.profile_window(value, 10) == window


@pytest.mark.parametrize('value', ['5,3', '0,2', '3,11', 'a,b', '1,2,3', [1.5, 2], True, '-1'])
def test_profile_window_bad_values_one_line(value):
  with pytest.raises(ConfigError) as error:
    metrics.profile_window(value, 10)
  assert 'config.profile_steps' in str(error.value) and '\n' not in str(error.value)


def test_step_profiler_traces_its_window(tmp_path):
  step = jax.jit(lambda x: x @ x)
  profiler = metrics.StepProfiler('2,3', 4, str(tmp_path / 'profile'))
  silent = metrics.StepProfiler('2,3', 4, str(tmp_path / 'silent'), enabled=False)
  x = jnp.ones((8, 8))
  for number in range(1, 5):
    for p in (profiler, silent):
      p.before(number)
    x = step(x)
    assert profiler.active == (number in (2, 3))
    for p in (profiler, silent):
      p.after(number, x)
  assert glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*'))
  assert not os.path.exists(tmp_path / 'silent')


def test_last_eval(tmp_path):
  assert metrics.last_eval(str(tmp_path)) == {}
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(2, {'eval/top1': 0.25, 'eval/loss': 2.0})
  writer.write(3, {'loss': 1.0})
  writer.write(4, {'eval/top1': 0.5, 'eval/loss': 1.5})
  writer.write(5, {'loss': 0.5})
  assert metrics.last_eval(str(tmp_path)) == {'eval/top1': 0.5, 'eval/loss': 1.5}


def test_run_reports_summary_fields_profile_and_finished_metrics(tiny_tfds, tmp_path, capsys):
  config = tiny_config(*tiny_tfds, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                       profile_steps='2,2')
  workdir = str(tmp_path)
  final = train.train_and_evaluate(config, workdir, tune_host=False)
  printed = capsys.readouterr().out
  assert 'FLOPs/image' in printed and 'conv1' in printed
  assert glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*'))
  assert 'receptive_fields' in tensorboard_values(os.path.join(workdir, 'tensorboard'))
  assert train.train_and_evaluate(config, workdir, tune_host=False) == final
  bad = tiny_config(*tiny_tfds, profile_steps='1,9')
  with pytest.raises(ConfigError, match='config.profile_steps'):
    train.train_and_evaluate(bad, str(tmp_path / 'bad'), tune_host=False)
