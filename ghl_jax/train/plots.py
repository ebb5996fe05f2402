"""Plots: training curves of runs side by side, and first-layer receptive fields.

CLI: ``python -m ghl_jax.train.plots curves OUT.png LABEL=WORKDIR ...`` and
``python -m ghl_jax.train.plots fields OUT.png WORKDIR [--layer conv1]`` (any checkpoint in WORKDIR).
Figures are drawn on their own Agg canvas: importing this module leaves matplotlib's backend and
pyplot's figures as they were (notebooks keep their inline backend).
"""
from __future__ import annotations

import sys
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from ghl_jax.train import metrics


def _figure(**kwargs) -> Figure:
  """A figure outside pyplot, rendered by Agg whatever the current backend."""
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def plot_curves(runs: Mapping[str, str], out: str) -> str:
  """Train loss and eval top-1 over steps for ``{label: workdir}``, saved to ``out``."""
  fig = _figure(figsize=(10, 3.8))
  ax_loss, ax_acc = fig.subplots(1, 2)
  for label, workdir in runs.items():
    rows = metrics.read(workdir)
    train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
    evals = [(r['step'], 100 * r['eval/top1']) for r in rows if 'eval/top1' in r]
    if train:
      ax_loss.plot(*zip(*train), label=label)
    if evals:
      ax_acc.plot(*zip(*evals), marker='o', label=label)
  ax_loss.set(xlabel='step', ylabel='train loss', title='Training loss')
  ax_acc.set(xlabel='step', ylabel='test top-1 (%)', title='Test accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  return out


def field_grid(kernel: np.ndarray, max_fields: int = 96) -> np.ndarray:
  """Tiles an HWIO conv kernel's filters (each min-max scaled) into one image."""
  kernel = np.asarray(kernel, np.float32)[..., :max_fields]
  h, w, c, n = kernel.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  shown = c if c in (1, 3) else 1
  grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, shown), np.float32)
  for i in range(n):
    f = kernel[..., :shown, i] if c in (1, 3) else np.mean(kernel[..., i], -1, keepdims=True)
    f = (f - f.min()) / (f.max() - f.min() + 1e-12)
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = f
  return grid[..., 0] if shown == 1 else grid


def field_image(kernel: np.ndarray, min_side: int = 256) -> np.ndarray:
  """:func:`field_grid` as an ``[H, W, C]`` float image in [0, 1], enlarged (nearest pixel) to at
  least ``min_side`` pixels on its shorter side, for TensorBoard."""
  grid = field_grid(kernel)
  grid = grid[..., None] if grid.ndim == 2 else grid
  scale = max(1, -(-min_side // min(grid.shape[:2])))
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def plot_fields(kernel: np.ndarray, out: str, title: str = 'First-layer receptive fields') -> str:
  grid = field_grid(kernel)
  fig = _figure(figsize=(6, 6))
  ax = fig.subplots()
  ax.imshow(grid, cmap='gray' if grid.ndim == 2 else None, interpolation='nearest')
  ax.set_axis_off()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  return out


def latest_params(workdir: str) -> dict:
  """Params of the newest checkpoint in ``workdir`` as numpy, on any device topology."""
  import jax  # pylint: disable=import-outside-toplevel
  from ghl_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, checkpoint.read_latest(workdir)['params'])


def _main(argv):
  if len(argv) < 3 or argv[0] not in ('curves', 'fields'):
    raise SystemExit(__doc__)
  kind, out, rest = argv[0], argv[1], argv[2:]
  if kind == 'curves':
    print(plot_curves(dict(item.split('=', 1) for item in rest), out))
  else:
    layer = rest[rest.index('--layer') + 1] if '--layer' in rest else 'conv1'
    print(plot_fields(latest_params(rest[0])[layer]['kernel'], out, f'{layer} receptive fields'))


if __name__ == '__main__':
  _main(sys.argv[1:])
