"""launch/gpu.sh against a stand-in venv: installs the CUDA jaxlib when missing, needs a GPU."""
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stand-in .venv/bin/python: FAKE_READY says whether the packages are installed, FAKE_GPUS what
# JAX's GPU probe prints; `-m experiments.main ARGS` echoes ARGS.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ]; then echo "main ${*:3}"; exit 0; fi
case "$2" in
  *importlib.metadata*) [ "$FAKE_READY" = 1 ]; exit ;;
  *default_backend*) [ -n "$FAKE_GPUS" ] && echo "$FAKE_GPUS"; exit 0 ;;
esac
exit 3
"""


def run_launcher(tmp_path, *args, **env):
  root = tmp_path / 'repo'
  (root / 'launch').mkdir(parents=True)
  for name in ('gpu.sh', 'restart.sh'):                 # gpu.sh runs main through restart.sh
    shutil.copy(os.path.join(REPO, 'launch', name), root / 'launch' / name)
  bin_dir = root / '.venv' / 'bin'
  bin_dir.mkdir(parents=True)
  (bin_dir / 'python').write_text(FAKE_PYTHON)
  (bin_dir / 'pip').write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/pip.log\n')
  (bin_dir / 'activate').write_text(f'export PATH="{bin_dir}:$PATH"\n')
  for name in ('python', 'pip'):
    (bin_dir / name).chmod(0o755)
  result = subprocess.run(['bash', str(root / 'launch' / 'gpu.sh'), '--workdir=w', *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, 'FAKE_READY': '0', 'FAKE_GPUS': '', **env})
  pip_log = tmp_path / 'pip.log'
  return result, pip_log.read_text() if pip_log.exists() else ''


def test_installs_cuda_jaxlib_into_an_existing_venv_and_stops_without_gpu(tmp_path):
  result, pip_log = run_launcher(tmp_path)
  assert 'jax[cuda12]' in pip_log
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith('error: JAX finds no GPU')


def test_ready_venv_prints_its_gpus_and_trains(tmp_path):
  result, pip_log = run_launcher(tmp_path, FAKE_READY='1', FAKE_GPUS='8 x NVIDIA H100')
  assert result.returncode == 0, result.stderr
  assert pip_log == ''
  assert ': 8 x NVIDIA H100' in result.stdout
  assert result.stdout.strip().endswith('main --workdir=w --config.compute_dtype=auto')   # bf16 on the GPU
  result, _ = run_launcher(tmp_path / 'own', '--config.compute_dtype', 'float32', FAKE_READY='1', FAKE_GPUS='1 x L4')
  assert result.stdout.strip().endswith('main --workdir=w --config.compute_dtype float32')  # the user's choice
