"""Where a run's files live: a local folder, or a bucket URL that every host shares (``gs://``, ``s3://``).

Every file of a workdir is reached through :func:`path` (``etils.epath``; ``gcsfs`` / ``s3fs`` serve
the URLs, as they serve orbax's checkpoints). A bucket object cannot be appended to, so a run's
growing logs (``metrics.jsonl``, TensorBoard events, profiler traces) are written to a local
:class:`Staging` folder and copied up whole: as they grow (at most every ``every_s`` seconds), after
every checkpoint and at the end. Rows written after the last copy are lost with a killed host; a
resume drops the rows past its checkpoint anyway, and each save is followed by a copy (a copy that
fails is one warning line and is tried again at the next).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from etils import epath

from ghl_jax.train.validate import ConfigError

BUCKETS = {'gs': 'gcsfs', 's3': 's3fs'}    # URL scheme -> the package that serves it


def scheme(workdir) -> str | None:
  """``'gs'`` for ``gs://bucket/run``; None for a local folder."""
  head, sep, _ = os.fspath(workdir).partition('://')
  return head if sep else None


def path(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path``: a URL as it is, a local folder made absolute."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if scheme(workdir) else os.path.abspath(workdir))


def check(workdir: str) -> None:
  """The workdir exists (or can be created) and this host can write to it; else one line saying why."""
  name = scheme(workdir)
  if name is None and scheme(path(workdir)):       # etils reads a /gs/... folder as gs://...
    raise ConfigError(f'--workdir {workdir} reads as the bucket {path(workdir)} (etils maps /gs/, /s3/, ... '
                      'folders to buckets): write the URL for a bucket, or choose another folder.')
  if name is None:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as error:
      raise ConfigError(f'Cannot create --workdir {workdir}: {error.strerror}; choose a writable directory.') from None
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise ConfigError(f'--workdir {workdir} is not writable; choose a writable directory.')
    return
  if name not in BUCKETS:
    raise ConfigError(f'--workdir {workdir}: {name}:// is not supported; use '
                      f'{" or ".join(s + "://" for s in BUCKETS)}, or a local (or mounted) folder.')
  probe = path(workdir) / f'.write-check-{socket.gethostname()}-{os.getpid()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except ImportError:
    raise ConfigError(f'--workdir {workdir} needs the {BUCKETS[name]} package: pip install {BUCKETS[name]}.') from None
  except Exception as error:  # pylint: disable=broad-except  # the store's own error: credentials, no bucket
    raise ConfigError(f'Cannot write to --workdir {workdir} ({_first_line(error)}); check the bucket '
                      f'name, this host\'s credentials and that {BUCKETS[name]} is installed.') from None


def write_text(target: epath.Path, text: str) -> None:
  """Writes a whole file atomically: a reader sees the old or the new one (a local file is synced
  to disk and renamed; a bucket object is replaced whole by the store)."""
  if scheme(target):
    target.write_text(text)
    return
  tmp = f'{target}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


class Staging:
  """The local folder that a bucket workdir's logs are written to and :meth:`sync` copies up; for a
  local workdir, the workdir itself (nothing to copy)."""

  def __init__(self, workdir: str, *, every_s: float = 60.0):
    self.remote = path(workdir) if scheme(workdir) else None
    self.local = tempfile.mkdtemp(prefix='ghl_jax-logs-') if self.remote else os.path.abspath(workdir)
    self.every_s = every_s
    self._copied = {}                 # relative path -> (size, mtime) when last copied up
    self._last = time.monotonic()

  def fetch(self, name: str) -> None:
    """Copies ``name`` down from the bucket if it is there (the log a resumed run goes on with)."""
    if self.remote is None or not (self.remote / name).exists():
      return
    local = os.path.join(self.local, name)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, 'wb') as f:
      f.write((self.remote / name).read_bytes())
    self._copied[name] = _stamp(local)

  def sync(self, *, force: bool = False) -> int:
    """Copies up every file that changed since its last copy (unless the last sync is under
    ``every_s`` old and not ``force``); returns how many copies failed. A failed copy is one line and
    is tried again next time."""
    if self.remote is None or (not force and time.monotonic() - self._last < self.every_s):
      return 0
    self._last, failed = time.monotonic(), 0
    for root, _, files in os.walk(self.local):
      for file in files:
        local = os.path.join(root, file)
        name = os.path.relpath(local, self.local)
        stamp = _stamp(local)
        if self._copied.get(name) == stamp:
          continue
        try:
          (self.remote / name).parent.mkdir(parents=True, exist_ok=True)
          with open(local, 'rb') as f:
            (self.remote / name).write_bytes(f.read())
          self._copied[name] = stamp
        except Exception as error:  # pylint: disable=broad-except  # the run goes on; the copy is retried
          failed += 1
          print(f'warning: could not copy {name} to {self.remote} ({_first_line(error)}); '
                f'it stays in {self.local} and is tried again.', flush=True)
    return failed

  def close(self) -> None:
    """The last copy; the local folder is removed once everything in it is up."""
    if self.remote is None:
      return
    if not self.sync(force=True):
      shutil.rmtree(self.local, ignore_errors=True)
    else:
      print(f'warning: some logs could not be copied to {self.remote}; they are kept in {self.local}.', flush=True)


def _stamp(local: str) -> tuple:
  status = os.stat(local)
  return status.st_size, status.st_mtime_ns


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0]}' if text else type(error).__name__
