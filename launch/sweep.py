"""Expands a config's declared sweep into launch commands.

    python launch/sweep.py experiments/configs/cifar10_resnet_ghl.py --workdir_root=runs \
        [--seeds=0,1,2] [--dry_run]

Each entry of ``config.sweep`` (a dict of dotted field → value) becomes one
``python -m experiments.main`` command with ``--config.FIELD=VALUE`` overrides and its own
workdir; ``--seeds`` repeats each entry once per seed (``--config.seed=N``, workdir name ending
in ``seedN``; ``python -m experiments.report`` pools them). ``--dry_run`` prints the commands;
otherwise they run one after another (or pass ``--launcher="bash launch/gpu.sh"`` to prefix each).
"""
from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

from absl import app
from absl import flags

flags.DEFINE_string('workdir_root', 'workdirs', 'Each run writes to WORKDIR_ROOT/<config>/<name>.')
flags.DEFINE_bool('dry_run', False, 'Print the commands instead of running them.')
flags.DEFINE_string('launcher', '', 'Prefix for each command (e.g. "bash launch/gpu.sh").')
flags.DEFINE_string('arg', '', 'Text after ":" passed to get_config (e.g. runlocal).')
flags.DEFINE_list('seeds', [], 'Seeds to run each sweep entry with (e.g. 0,1,2); none: the config\'s seed.')
FLAGS = flags.FLAGS


def load_config(path: str, arg: str = ''):
  spec = importlib.util.spec_from_file_location('swept_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_name(overrides: dict) -> str:
  return '_'.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items()).replace('/', '-')


def with_seeds(entries: list, seeds: list) -> list:
  """``(overrides, workdir name)`` of each entry, once per seed when ``seeds`` are given."""
  if not seeds:
    return [(dict(e), run_name(e) or 'run') for e in entries]
  if any('seed' in e for e in entries):
    raise app.UsageError("config.sweep sets the seed already: drop --seeds or the seed from config.sweep.")
  return [({**e, 'seed': s}, '_'.join(filter(None, (run_name(e), f'seed{s}'))))
          for e in entries for s in seeds]


def commands(path: str, workdir_root: str, arg: str = '', launcher: str = '', seeds=()) -> list[str]:
  """One shell command per sweep entry and seed (one entry when the config declares no sweep)."""
  config = load_config(path, arg)
  stem = path.rsplit('/', 1)[-1].removesuffix('.py')
  entries = [dict(e) for e in config.get('sweep') or [{}]]
  out = []
  for overrides, name in with_seeds(entries, list(seeds)):
    workdir = f'{workdir_root}/{stem}/{name}'
    config_arg = f'{path}:{arg}' if arg else path
    parts = (shlex.split(launcher) + [sys.executable, '-m', 'experiments.main', f'--config={config_arg}',
                                      f'--workdir={workdir}'] +
             [f'--config.{k}={v}' for k, v in overrides.items()])
    out.append(shlex.join(parts))
  return out


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: sweep.py CONFIG_FILE [--workdir_root=DIR] [--seeds=0,1,2] [--dry_run]')
  if not all(s.isdigit() for s in FLAGS.seeds):
    raise app.UsageError(f'--seeds takes integers >= 0 (e.g. --seeds=0,1,2), not {",".join(FLAGS.seeds)}.')
  seeds = list(dict.fromkeys(int(s) for s in FLAGS.seeds))
  for command in commands(argv[1], FLAGS.workdir_root, FLAGS.arg, FLAGS.launcher, seeds):
    print(command, flush=True)
    if not FLAGS.dry_run:
      subprocess.run(command, shell=True, check=True)


if __name__ == '__main__':
  app.run(main)
