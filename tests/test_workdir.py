"""Bucket workdirs (gs://): every file of a run reaches the bucket whole, a resumed run goes on with
its log, and what a bucket refuses is one line. The bucket is an in-memory fsspec filesystem that,
like a real one, refuses to append to an object."""
import importlib
import json
import os

from fsspec.implementations.memory import MemoryFileSystem
import ml_collections
import pytest

from experiments import report
from ghl_jax.train import checkpoint, metrics, run_config
from ghl_jax.train import workdir as workdir_lib
from ghl_jax.train.validate import ConfigError

RUN = 'gs://bucket/runs/ghl'
REGISTRY = importlib.import_module('fsspec.registry')    # the module (fsspec.registry is its mapping)


def _reset_epath_caches():
  from etils.epath import backend, gpath  # pylint: disable=import-outside-toplevel
  gpath._is_tf_installed.cache_clear()                           # pylint: disable=protected-access
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()    # pylint: disable=protected-access


@pytest.fixture
def bucket(monkeypatch):
  """``gs://`` served from memory; returns ``{object path: bytes}`` of what the bucket holds."""

  class Bucket(MemoryFileSystem):
    protocol = ('gs', 'gcs')
    store, pseudo_dirs = {}, ['']
    refuse_writes = False

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ('gs://', 'gcs://'):
        path = path[len(prefix):] if path.startswith(prefix) else path
      return super()._strip_protocol(path)

    def _open(self, path, mode='rb', **kwargs):
      if 'a' in mode or '+' in mode:
        raise OSError(f'a bucket object cannot be appended to: {path}')
      if 'w' in mode and Bucket.refuse_writes:
        raise PermissionError(f'403 Forbidden: {path}')
      return super()._open(path, mode, **kwargs)

  for name in Bucket.protocol:
    monkeypatch.setitem(REGISTRY._registry, name, Bucket)   # pylint: disable=protected-access
  monkeypatch.setenv('EPATH_USE_TF', 'false')       # served by fsspec even where TensorFlow is installed
  _reset_epath_caches()
  yield Bucket
  _reset_epath_caches()


def held(fs, name: str) -> bytes:
  return fs.store['/bucket/runs/ghl/' + name].getvalue()


def test_logs_reach_the_bucket_and_a_resume_goes_on_with_them(bucket):
  writer = metrics.MetricWriter(RUN)
  assert not writer.logdir.startswith('gs://')           # written locally, copied up whole
  for step in (1, 2, 3):
    writer.write(step, {'loss': 1.0 / step})
  assert '/bucket/runs/ghl/metrics.jsonl' not in bucket.store   # copies as it grows: once a minute
  writer.sync()                                          # what the loop does after each checkpoint
  rows = [json.loads(line) for line in held(bucket, 'metrics.jsonl').decode().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3] and rows[2]['loss'] == pytest.approx(1 / 3)
  assert any(name.startswith('/bucket/runs/ghl/tensorboard/events.out.tfevents.') for name in bucket.store)
  writer.write(4, {'loss': 0.25})
  writer.close()
  assert not os.path.exists(writer.logdir)               # everything is up: the staging folder is gone
  assert [r['step'] for r in metrics.read(RUN)] == [1, 2, 3, 4]

  resumed = metrics.MetricWriter(RUN, tensorboard=False)  # a new host resumes from the step-2 checkpoint
  resumed.rewind(2)
  assert [r['step'] for r in metrics.read(RUN)] == [1, 2]  # the rewind is copied up at once
  resumed.write(3, {'loss': 0.5})
  resumed.close()
  assert [(r['step'], r['loss']) for r in metrics.read(RUN)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  assert metrics.last_eval(RUN) == {}
  other_process = metrics.MetricWriter(RUN, enabled=False)  # only process 0 logs: no staging, no copy
  other_process.write(9, {'loss': 0.1})
  other_process.close()
  assert [r['step'] for r in metrics.read(RUN)] == [1, 2, 3]


def test_config_checkpoints_and_report_read_a_bucket_workdir(bucket):
  workdir_lib.check(RUN)
  assert not any('.write-check' in name for name in bucket.store)      # the probe is removed
  config = ml_collections.ConfigDict({'model': {'name': 'deephebb'}, 'seed': 3})
  run_config.save(config, RUN)
  assert json.loads(held(bucket, 'config.json')) == {'model': {'name': 'deephebb'}, 'seed': 3}
  assert run_config.read(RUN) == {'model.name': 'deephebb', 'seed': 3}
  for name in ('2', '4', 'tmp-6'):
    workdir_lib.path(RUN).joinpath('checkpoints', name, 'x').parent.mkdir(parents=True)
    workdir_lib.path(RUN).joinpath('checkpoints', name, 'x').write_text('')
  assert checkpoint.saved_steps(RUN) == [2, 4]
  writer = metrics.MetricWriter(RUN, tensorboard=False)
  writer.write(4, {'loss': 0.5, 'eval/top1': 0.25})
  writer.close()
  run = report.load(RUN)
  assert run.complete and run.config['model.name'] == 'deephebb' and run.rows[-1]['eval/top1'] == 0.25
  with pytest.raises(report.ReportError, match='no such directory'):
    report.check('gs://bucket/runs/absent')


def test_what_a_bucket_refuses_is_one_line(bucket, capsys):
  with pytest.raises(ConfigError, match=r'ftp:// is not supported; use gs:// or s3://'):
    workdir_lib.check('ftp://host/run')
  bucket.refuse_writes = True
  with pytest.raises(ConfigError, match=r'Cannot write to --workdir gs://bucket/runs/ghl \(PermissionError: '
                                        r'403 Forbidden.*\); check the bucket'):
    workdir_lib.check(RUN)
  writer = metrics.MetricWriter(RUN, tensorboard=False)
  writer.write(1, {'loss': 1.0})
  writer.sync()                                   # the copy fails: one line, the run goes on
  assert 'warning: could not copy metrics.jsonl to gs://bucket/runs/ghl (PermissionError' in capsys.readouterr().out
  bucket.refuse_writes = False
  writer.write(2, {'loss': 0.5})
  writer.close()                                  # tried again, and it lands
  assert [r['step'] for r in metrics.read(RUN)] == [1, 2] and not os.path.exists(writer.logdir)


def test_a_folder_that_etils_reads_as_a_bucket_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r'--workdir /gs/bucket/run reads as the bucket gs://bucket/run'):
    workdir_lib.check('/gs/bucket/run')
  workdir_lib.check(str(tmp_path / 'gs' / 'run'))          # a gs folder deeper down is a folder


def test_a_missing_bucket_package_names_it(monkeypatch):
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  for name in ('gs', 'gcs'):                        # as where gcsfs is not installed
    monkeypatch.delitem(REGISTRY._registry, name, raising=False)   # pylint: disable=protected-access
    monkeypatch.setitem(REGISTRY.known_implementations, name,
                        {'class': 'no_such_package.GCSFileSystem', 'err': 'Install gcsfs'})
  _reset_epath_caches()
  try:
    with pytest.raises(ConfigError, match=r'needs the gcsfs package: pip install gcsfs\.$'):
      workdir_lib.check(RUN)
    with pytest.raises(report.ReportError, match=r'gs://bucket/runs/ghl: cannot read it \(ImportError'):
      report.check(RUN)
  finally:
    _reset_epath_caches()


def test_a_local_workdir_is_written_in_place(tmp_path):
  workdir = str(tmp_path / 'run')
  workdir_lib.check(workdir)
  writer = metrics.MetricWriter(workdir, tensorboard=False)
  assert writer.logdir == workdir
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  blocked = tmp_path / 'file'
  blocked.write_text('')
  with pytest.raises(ConfigError, match='Cannot create --workdir'):
    workdir_lib.check(str(blocked / 'run'))
