"""The Colab quickstart notebook runs top to bottom, twice (CPU-sized: tiny data, a few steps); the
second run reports the first one's metrics and the kernel keeps its matplotlib backend and allocator."""
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the kernel before the notebook: its backend, and every change of the allocator setting.
RECORD = """
import matplotlib
from ghl_jax.kernels import host_memory
backend_before, allocator_calls, _keep = matplotlib.get_backend(), [], host_memory.keep_freed_memory
host_memory.keep_freed_memory = lambda *args: allocator_calls.append(args) or _keep(*args)
"""
CHECK = """
assert matplotlib.get_backend() == backend_before, (matplotlib.get_backend(), backend_before)
assert not allocator_calls, allocator_calls
"""


def reported(cell) -> list:
  return [line for out in cell.get('outputs', []) for line in out.get('text', '').splitlines()
          if 'test top-1' in line]


def test_quickstart_notebook_runs_twice(tiny_tfds_gray, tmp_path, monkeypatch):
  data_dir, name = tiny_tfds_gray
  for key, value in {'GHL_NB_STEPS': '4', 'GHL_NB_WIDTH': '0.05', 'GHL_NB_DATASET': name,
                     'GHL_NB_DATA_DIR': data_dir, 'GHL_NB_WORKDIR': str(tmp_path / 'work'),
                     'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu',
                     'PYTHONPATH': REPO}.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', 'quickstart.ipynb'), as_version=4)
  cells = list(notebook.cells)
  training = next(cell for cell in cells if 'train_and_evaluate' in cell.source)
  record, check = nbformat.v4.new_code_cell(RECORD), nbformat.v4.new_code_cell(CHECK)
  notebook.cells = [record, *cells, check]        # execute_cell writes each cell back at its index
  client = NotebookClient(notebook, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}})
  runs = []
  with client.setup_kernel():
    client.execute_cell(record, 0)
    for _ in range(2):
      for index, cell in enumerate(cells, 1):
        client.execute_cell(cell, index)
      runs.append(reported(training))
    client.execute_cell(check, len(cells) + 1)
  first, second = runs
  assert [line[:15] for line in first] == ['GHL  test top-1', 'BP   test top-1']
  assert second == first
  for png in ('curves.png', 'ghl_fields.png', 'bp_fields.png'):
    assert os.path.getsize(tmp_path / 'work' / png) > 1000


def test_nnx_notebook_runs(monkeypatch):
  for key, value in {'GHL_NB_STEPS': '3', 'GHL_NB_CIFAR10': '', 'JAX_PLATFORMS': 'cpu',
                     'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'PYTHONPATH': REPO}.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', 'nnx.ipynb'), as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  printed = [line for cell in notebook.cells for out in cell.get('outputs', [])
             for line in out.get('text', '').splitlines()]
  assert any(line.startswith('GHL: final loss') for line in printed)
  assert any(line.startswith('BP: final loss') for line in printed)
