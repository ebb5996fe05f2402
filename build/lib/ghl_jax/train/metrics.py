"""Metrics to a JSONL file and TensorBoard (process 0 only), and a progress line."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
  """Appends ``{'step': s, 'time': unix time, **scalars}`` to ``workdir/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled and tensorboard:
      from flax.metrics import tensorboard as tb  # pylint: disable=import-outside-toplevel
      self._tb = tb.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def rewind(self, step: int) -> None:
    """Drops rows after ``step`` (the restored checkpoint): resumed runs log each step once."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and _complete(line) and json.loads(line)['step'] <= step]
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(rows)
    os.replace(self.path + '.tmp', self.path)

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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _complete(line: str) -> bool:
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:     # a line cut short by a kill
    return False


def read(workdir: str) -> list[dict]:
  """Rows of ``metrics.jsonl``; a step logged twice (after a resume) keeps its last row."""
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      if not _complete(line):
        continue
      row = json.loads(line)
      rows[(row['step'], tuple(sorted(row)))] = row
  return sorted(rows.values(), key=lambda r: r['step'])


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
