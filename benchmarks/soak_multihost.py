"""Soak of multi-process runs: N consecutive 2-process CLI runs over loopback, counted as
completed / hung / failed.

  python -m benchmarks.soak_multihost --runs 40 [--steps 40] [--timeout 240] [--dumps DIR]

Each run starts ``experiments.main`` twice (``JAX_COORDINATOR_ADDRESS`` on 127.0.0.1, gloo, 2 simulated
CPU devices per process) on the quickstart config shrunk to a tiny Fashion-MNIST-shaped dataset
written once: ``--steps`` steps, an eval and a checkpoint every ``--every`` steps. A run whose processes
have not both exited after ``--timeout`` seconds is counted as hung: with ``--dumps`` the Python and
native stacks of both processes are written there (py-spy), then both are killed with SIGKILL.
Extra ``--config.FIELD=VALUE`` arguments go to every run (e.g. the watchdog's timeouts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def write_dataset(data_dir: str, name: str = 'soak_gray', num_train: int = 256, num_test: int = 80):
  """A Fashion-MNIST-shaped tfds dataset (28x28x1 uint8, 10 classes) in ``data_dir``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(28, 28, 1)),
                                         'label': tfds.features.ClassLabel(num_classes=10)})

  def examples(count):
    images = rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8)
    return [(i, {'image': images[i], 'label': i % 10}) for i in range(count)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, data_dir=data_dir, disable_shuffling=True,
      split_datasets={'train': examples(num_train), 'test': examples(num_test)})
  return name


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def command(data_dir: str, name: str, workdir: str, args) -> list[str]:
  overrides = {'data.name': name, 'data.data_dir': data_dir, 'model.kwargs.width': args.width,
               'batch_size': args.batch, 'eval_batch_size': args.eval_batch, 'num_train_steps': args.steps,
               'log_every_steps': 10, 'eval_every_steps': args.eval_every or args.every,
               'checkpoint_every_steps': args.every,
               'compilation_cache_dir': args.cache}
  return ([sys.executable, '-m', 'experiments.main', '--config=experiments/configs/quickstart.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()] + args.extra)


def dump_stacks(pids, path: str) -> None:
  """Python, then Python and native, stacks of ``pids`` into ``path`` (py-spy; a note if it is missing)."""
  spy = shutil.which('py-spy') or os.path.join(os.path.dirname(sys.executable), 'py-spy')
  with open(path, 'w') as out:
    for pid in pids:
      out.write(f'===== pid {pid}\n')
      out.flush()
      if not os.path.exists(spy):
        out.write('py-spy is not installed (pip install py-spy)\n')
        continue
      for native in ([], ['--native']):        # --native can fail to merge frames: Python stacks first
        out.flush()
        subprocess.run([spy, 'dump', *native, '--pid', str(pid)], stdout=out, stderr=subprocess.STDOUT,
                       timeout=120, check=False)


def one_run(index: int, data_dir: str, name: str, root: str, args) -> dict:
  workdir = os.path.join(root, f'run{index}')
  port = free_port()
  procs, logs = [], []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
               XLA_FLAGS='--xla_force_host_platform_device_count=2',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid))
    log = open(os.path.join(root, f'run{index}.p{pid}.log'), 'w')
    logs.append(log)
    procs.append(subprocess.Popen(command(data_dir, name, workdir, args), cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
  start = time.time()
  end = start + args.timeout
  while time.time() < end and any(p.poll() is None for p in procs):
    time.sleep(0.2)
  hung = any(p.poll() is None for p in procs)
  if hung and args.dumps:
    os.makedirs(args.dumps, exist_ok=True)
    dump_stacks([p.pid for p in procs if p.poll() is None], os.path.join(args.dumps, f'run{index}.txt'))
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()
  for log in logs:
    log.close()
  codes = [p.returncode for p in procs]
  outcome = 'hung' if hung else ('completed' if codes == [0, 0] else 'failed')
  tail = ''
  if outcome != 'completed':
    for pid in range(2):
      lines = open(os.path.join(root, f'run{index}.p{pid}.log')).read().strip().splitlines()
      tail += f' | p{pid}: ' + (lines[-1] if lines else '')
      if args.dumps:
        shutil.copy(os.path.join(root, f'run{index}.p{pid}.log'), args.dumps)
  if not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return {'run': index, 'outcome': outcome, 'codes': codes, 'seconds': round(time.time() - start, 1),
          'tail': tail}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--runs', type=int, default=40)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--every', type=int, default=20, help='eval and checkpoint every this many steps')
  parser.add_argument('--eval-every', type=int, default=0, help='eval every this many steps (0: --every)')
  parser.add_argument('--width', type=float, default=0.125, help='DeepHebb width')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--eval-batch', type=int, default=16)
  parser.add_argument('--train-examples', type=int, default=256)
  parser.add_argument('--eval-examples', type=int, default=80)
  parser.add_argument('--timeout', type=float, default=240.0, help='seconds before a run counts as hung')
  parser.add_argument('--dumps', default='', help='folder for stack dumps and logs of runs not completed')
  parser.add_argument('--json', default='', help='append the summary as one JSON line to this file')
  parser.add_argument('--label', default='', help='a name for this soak in the summary')
  parser.add_argument('--keep', action='store_true', help='keep the workdirs')
  args, args.extra = parser.parse_known_args(argv)
  root = tempfile.mkdtemp(prefix='soak_')
  args.cache = os.path.join(root, 'xla_cache')
  data_dir = os.path.join(root, 'tfds')
  name = write_dataset(data_dir, num_train=args.train_examples, num_test=args.eval_examples)
  counts = {'completed': 0, 'hung': 0, 'failed': 0}
  began = time.time()
  for index in range(args.runs):
    result = one_run(index, data_dir, name, root, args)
    counts[result['outcome']] += 1
    print(f"run {index + 1}/{args.runs}: {result['outcome']} {result['codes']} in {result['seconds']} s"
          f"{result['tail']}", flush=True)
  summary = {'label': args.label, 'runs': args.runs, **counts, 'steps': args.steps, 'every': args.every,
             'eval_every': args.eval_every or args.every, 'width': args.width, 'batch': args.batch,
             'eval_batch': args.eval_batch, 'eval_examples': args.eval_examples,
             'timeout_s': args.timeout, 'minutes': round((time.time() - began) / 60, 1), 'cpu': cpu_name(),
             'cores': os.cpu_count(), 'extra': args.extra}
  print('SUMMARY ' + json.dumps(summary), flush=True)
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(summary) + '\n')
  shutil.rmtree(root, ignore_errors=True)
  return 0 if counts['completed'] == args.runs else 1


if __name__ == '__main__':
  sys.exit(main())
