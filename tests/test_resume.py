"""Resuming a workdir: the saved config, refused and allowed changes, SIGTERM on one process of two."""
import hashlib
import json
import os
import re
import signal

import chex
import orbax.checkpoint as ocp
import pytest

from ghl_jax import train
from ghl_jax.train import metrics as metrics_lib
from ghl_jax.train import plots
from ghl_jax.train import run_config
from ghl_jax.train.checkpoint import saved_steps
from ghl_jax.train.validate import ConfigError
from test_fault_tolerance import checkpoint_digest, copy_of, free_port, logged_steps, start_worker, wait_for
from test_train import tiny_config

STEPS = 4


def config_of(tiny_tfds, **overrides):
  return tiny_config(*tiny_tfds, **{'num_train_steps': STEPS, 'checkpoint_every_steps': 2,
                                    'eval_every_steps': STEPS, **overrides})


@pytest.fixture(scope='module')
def first_run(tiny_tfds, tmp_path_factory):
  """A 4-step run checkpointed at steps 2 and 4: its workdir."""
  workdir = str(tmp_path_factory.mktemp('first'))
  train.train_and_evaluate(config_of(tiny_tfds), workdir)
  return workdir


def file_digest(path):
  return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def train_times(workdir):
  return {r['step']: r['time'] for r in metrics_lib.read(workdir) if 'loss' in r}


def test_saved_config_is_readable_json_and_checkpoint_metadata(tiny_tfds, first_run):
  with open(os.path.join(first_run, run_config.FILENAME)) as f:
    saved = json.load(f)
  assert saved['model']['kwargs']['width'] == 0.05 and saved['num_train_steps'] == STEPS
  assert run_config.flatten(saved) == run_config.flatten(config_of(tiny_tfds))
  manager = ocp.CheckpointManager(os.path.join(first_run, 'checkpoints'))
  assert manager.metadata(STEPS).custom_metadata['config']['model.kwargs.width'] == 0.05


@pytest.mark.parametrize('force', [False, True], ids=['refused_by_config', 'forced_refused_by_shapes'])
def test_changed_width_is_refused_and_the_workdir_untouched(tiny_tfds, first_run, tmp_path, force):
  """Without force the saved config refuses it; with force the checkpoint's shapes still do."""
  workdir = copy_of(first_run, tmp_path)
  before = checkpoint_digest(workdir), file_digest(os.path.join(workdir, 'config.json'))
  metrics_before = file_digest(os.path.join(workdir, 'metrics.jsonl'))
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config_of(tiny_tfds, **{'model.kwargs.width': 0.1, 'force': force}), workdir)
  text = str(error.value)
  assert 'model.kwargs.width' in text and '\n' not in text, text
  assert ('params/conv' in text) == force, text                # the kernels that no longer fit
  assert (checkpoint_digest(workdir), file_digest(os.path.join(workdir, 'config.json'))) == before
  assert file_digest(os.path.join(workdir, 'metrics.jsonl')) == metrics_before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_resumable_fields_may_change(tiny_tfds, first_run, tmp_path):
  workdir = copy_of(first_run, tmp_path)
  times = train_times(workdir)
  config = config_of(tiny_tfds, num_train_steps=STEPS + 2, eval_every_steps=STEPS + 2, log_every_steps=2,
                     checkpoint_every_steps=3, keep_checkpoints=3, eval_batch_size=8)
  train.train_and_evaluate(config, workdir)
  assert {s: t for s, t in train_times(workdir).items() if s <= STEPS} == times   # resumed, not restarted
  assert max(train_times(workdir)) == STEPS + 2
  assert saved_steps(workdir) == [2, 4, 6]
  assert run_config.read(workdir)['num_train_steps'] == STEPS + 2


def test_a_run_moved_to_bf16_hardware_resumes_in_bf16_with_a_note(tiny_tfds, first_run, tmp_path, capsys):
  """compute_dtype may change on resume (a launcher on a GPU passes auto): params and optimizer state
  stay float32, so the checkpoint restores; one line says the precision changed."""
  workdir = copy_of(first_run, tmp_path)
  train.train_and_evaluate(config_of(tiny_tfds, num_train_steps=STEPS + 1, eval_every_steps=STEPS + 1,
                                     compute_dtype='bfloat16'), workdir)
  assert max(train_times(workdir)) == STEPS + 1
  assert ('note: the saved run computes in float32; it resumes in bfloat16 (config.compute_dtype; params '
          'and optimizer state stay float32).') in capsys.readouterr().out
  assert run_config.read(workdir)['compute_dtype'] == 'bfloat16'


def test_a_retired_field_of_an_older_run_resumes_with_a_note(tiny_tfds, first_run, tmp_path, capsys):
  """A workdir saved when config.data.shuffle_buffer existed (the tf.data pipeline) resumes, with one
  line naming it; an unknown field that is not retired still refuses."""
  workdir = copy_of(first_run, tmp_path)
  path = os.path.join(workdir, run_config.FILENAME)
  with open(path) as f:
    saved = json.load(f)
  saved['data']['shuffle_buffer'] = 50_000
  with open(path, 'w') as f:
    json.dump(saved, f)
  train.train_and_evaluate(config_of(tiny_tfds, num_train_steps=STEPS + 1, eval_every_steps=STEPS + 1), workdir)
  assert max(train_times(workdir)) == STEPS + 1
  assert 'note: the saved run sets config.data.shuffle_buffer, which this version no longer has' in \
      capsys.readouterr().out
  saved['data']['crop_size'] = 3
  with open(path, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ConfigError, match='data.crop_size=3 there but unset now'):
    train.train_and_evaluate(config_of(tiny_tfds, num_train_steps=STEPS + 2), workdir)


def test_force_resumes_a_changed_experiment(tiny_tfds, first_run, tmp_path):
  workdir = copy_of(first_run, tmp_path)
  times = train_times(workdir)
  changed = config_of(tiny_tfds, num_train_steps=STEPS + 2, eval_every_steps=STEPS + 2, seed=1)
  with pytest.raises(ConfigError, match=r'^Workdir .* belongs to another run \(seed=0 there but 1 now\): '
                                        r'.*--config.force=True'):
    train.train_and_evaluate(changed, workdir)
  changed.force = True
  train.train_and_evaluate(changed, workdir)
  assert {s: t for s, t in train_times(workdir).items() if s <= STEPS} == times
  assert max(train_times(workdir)) == STEPS + 2
  assert run_config.read(workdir)['seed'] == 1          # the saved config follows the forced run


def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tiny_tfds, tmp_path):
  """Only process 1 sees SIGTERM: both save one step and exit 0; the resumed run equals an uninterrupted
  one. The first start trains the uninterrupted run, then the one that is interrupted."""
  total = 10                                      # within the first epoch of 12 batches of 8
  config = config_of(tiny_tfds, num_train_steps=total, eval_every_steps=total, checkpoint_every_steps=1000,
                     batch_size=8)
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')

  def start(workdirs):
    port = free_port()
    return [start_worker(config, os.pathsep.join(workdirs), devices=2, process_id=i, num_processes=2, port=port)
            for i in range(2)]

  def finish(workers):
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs

  workers = start([reference, workdir])
  wait_for(lambda: len(logged_steps(workdir)) >= 2, workers[0])
  workers[1].send_signal(signal.SIGTERM)
  outputs = finish(workers)
  stops = [sorted(set(re.findall(r'SIGTERM: process (\d) saved step (\d+)', out))) for out in outputs]
  assert [len(s) for s in stops] == [1, 1] and stops[0][0][1] == stops[1][0][1], stops
  stopped = int(stops[0][0][1])
  assert 2 <= stopped < total
  assert saved_steps(workdir) == [stopped] and logged_steps(workdir)[-1] == stopped
  finish(start([workdir]))
  assert logged_steps(workdir) == list(range(1, total + 1))
  chex.assert_trees_all_equal(plots.latest_params(workdir), plots.latest_params(reference))
