"""Metrics to a JSONL file and TensorBoard (process 0 only), a progress line, and profile traces.

TensorBoard (``tensorboard --logdir WORKDIR``) gets every logged scalar, the resolved config (HParams
and Text tabs) and the first layer's receptive fields at each evaluation (Images tab);
:class:`StepProfiler` writes a :mod:`jax.profiler` trace of chosen steps to ``WORKDIR/profile``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from ghl_jax.train import workdir as workdir_lib
from ghl_jax.train.validate import ConfigError


class MetricWriter:
  """Appends ``{'step': s, 'time': unix time, **scalars}`` to ``workdir/metrics.jsonl`` and TensorBoard.

  A bucket workdir's logs are written to a local staging folder (``logdir``) and copied up as they
  grow, at every :meth:`sync` (after each checkpoint) and at :meth:`close` (:mod:`workdir`).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.staging = workdir_lib.Staging(workdir) if enabled else None
    self.logdir = self.staging.local if enabled else workdir
    self.path = os.path.join(self.logdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      self.staging.fetch('metrics.jsonl')
    if enabled and tensorboard:
      from ghl_jax.train import events  # pylint: disable=import-outside-toplevel
      self._tb = events.SummaryWriter(os.path.join(self.logdir, 'tensorboard'))

  def rewind(self, step: int) -> None:
    """Drops rows after ``step`` (the restored checkpoint): resumed runs log each step once."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and _complete(line) and json.loads(line)['step'] <= step]
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(rows)
    os.replace(self.path + '.tmp', self.path)
    self.staging.sync(force=True)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time(), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for key, value in row.items():
        if key not in ('step', 'time'):
          self._tb.scalar(key, value, step)
      self._tb.flush()
    self.staging.sync()

  def write_config(self, config) -> None:
    """The resolved config: as HParams (dotted names) and whole as text, once per start."""
    if self._tb is None:
      return
    self._tb.hparams(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
    self._tb.text('config', '\n'.join('    ' + line for line in str(config).splitlines()), 0)
    self._tb.flush()

  def write_fields(self, step: int, kernel: Any) -> None:
    """An HWIO conv kernel (the first layer's) as an image of its receptive fields."""
    if self._tb is None or kernel is None or np.ndim(kernel) != 4:
      return
    from ghl_jax.train import plots  # pylint: disable=import-outside-toplevel
    self._tb.image('receptive_fields', plots.field_image(_local(kernel)), step)
    self._tb.flush()

  def sync(self) -> None:
    """Copies the logs of a bucket workdir up now (the loop calls it after each checkpoint)."""
    if self.enabled:
      self.staging.sync(force=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self.enabled:
      self.staging.close()


def _local(array) -> np.ndarray:
  """A replicated array's value from this process's first shard (no collective across hosts)."""
  return np.asarray(array.addressable_data(0) if isinstance(array, jax.Array) else array)


def _complete(line: str) -> bool:
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:     # a line cut short by a kill
    return False


def read(workdir: str) -> list[dict]:
  """Rows of ``metrics.jsonl``; a step logged twice (after a resume) keeps its last row."""
  rows = {}
  with (workdir_lib.path(workdir) / 'metrics.jsonl').open() as f:
    for line in f:
      if not _complete(line):
        continue
      row = json.loads(line)
      rows[(row['step'], tuple(sorted(row)))] = row
  return sorted(rows.values(), key=lambda r: r['step'])


def last_eval(workdir: str) -> dict:
  """The ``eval/*`` metrics of the last evaluation stored in ``workdir`` (``{}`` when there is none)."""
  if not (workdir_lib.path(workdir) / 'metrics.jsonl').exists():
    return {}
  evals = [row for row in read(workdir) if any(key.startswith('eval/') for key in row)]
  return {k: v for k, v in evals[-1].items() if k.startswith('eval/')} if evals else {}


class Progress:
  """``step 120/1000 (12%) | 850 img/s | ETA 0:05:10 | loss 1.23`` every few steps."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total, self.batch = total_steps, batch_size
    self.t0, self.s0 = time.time(), start_step

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = (step - self.s0) / elapsed
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) else '?'
    shown = ' | '.join(f'{k} {float(v):.4g}' for k, v in scalars.items())
    return (f'step {step}/{self.total} ({100 * step / self.total:.0f}%) | '
            f'{rate * self.batch:.0f} img/s | ETA {eta_text} | {shown}')

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """Prints the line on process 0 (every process computes the same global metrics)."""
    if jax.process_index() == 0:
      print(self.line(step, scalars), flush=True)


def profile_window(value, total_steps: int) -> tuple[int, int] | None:
  """``'10,12'``, ``[10, 12]`` or ``10`` → ``(first, last)`` train step to trace (steps counted from 1,
  as logged); ``None``, ``''`` or ``()`` → None (off)."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, str):
    items = value.split(',')
  else:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
  if not items:
    return None
  steps = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in items]
  if (len(steps) <= 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
      and 1 <= steps[0] <= steps[-1] <= total_steps):
    return steps[0], steps[-1]
  raise ConfigError(f"config.profile_steps must be 'first,last' with 1 <= first <= last <= {total_steps} "
                    f"(the run's steps), e.g. '10,12'; got {value!r}.")


class StepProfiler:
  """A :mod:`jax.profiler` trace of train steps ``first..last`` (of :func:`profile_window`) into
  ``log_dir``; TensorBoard's profile plugin (``pip install tensorboard-plugin-profile``) shows it."""

  def __init__(self, value, total_steps: int, log_dir: str, *, enabled: bool = True, shown_as: str = ''):
    window = profile_window(value, total_steps)     # every process validates, the main one traces
    self.window = window if enabled else None
    self.log_dir = log_dir
    self.shown_as = shown_as or log_dir             # where the user finds it (a bucket workdir's copy)
    self.active = False

  def before(self, step: int) -> None:
    """Starts the trace before step ``step`` (the first of the window, or of a resumed run in it)."""
    if self.window and not self.active and self.window[0] <= step <= self.window[1]:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, outputs: Any) -> None:
    """Stops it once step ``step`` (the window's last) has finished computing ``outputs``."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      print(f'profile trace written to {self.shown_as}', flush=True)
