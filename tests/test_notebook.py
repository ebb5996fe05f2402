"""The Colab quickstart notebook runs top to bottom (CPU-sized: tiny data, a few steps)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tiny_tfds_gray, tmp_path, monkeypatch):
  data_dir, name = tiny_tfds_gray
  for key, value in {'GHL_NB_STEPS': '4', 'GHL_NB_WIDTH': '0.05', 'GHL_NB_DATASET': name,
                     'GHL_NB_DATA_DIR': data_dir, 'GHL_NB_WORKDIR': str(tmp_path / 'work'),
                     'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu',
                     'PYTHONPATH': REPO}.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', 'quickstart.ipynb'), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  outputs = ''.join(out.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                    for out in cell.get('outputs', []))
  assert 'GHL  test top-1' in outputs and 'BP   test top-1' in outputs
  for png in ('curves.png', 'ghl_fields.png', 'bp_fields.png'):
    assert os.path.getsize(tmp_path / 'work' / png) > 1000
