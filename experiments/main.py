"""Trains a config: ``python -m experiments.main --config=experiments/configs/NAME.py --workdir=DIR``.

Any field can be overridden, e.g. ``--config.batch_size=128 --config.model.name=fasthebb``;
``--config=...py:runlocal`` shrinks the run for a laptop. On several hosts, set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run under
SLURM / on a TPU VM slice, where they are discovered) and start the same command on every host.

A bad command line (unknown field, missing config file, bad value) ends in one ``error:`` line
on stderr and exit status 2. Library logs (XLA's C++ lines, absl INFO from orbax and tfds)
stay off unless asked for with ``--verbosity=0`` (``-v 0``) or ``GHL_VERBOSE=1``; the trainer's
progress lines always print.
"""
import contextlib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import quiet
from experiments.configs import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics (resumed if present).')
flags.mark_flags_as_required(['config', 'workdir'])

CONFIG_FLAG = re.compile(r'^--?config(=|$)')
OVERRIDE_FLAG = re.compile(r'^--?(no)?config\.([^=]+)')
VERBOSITY_FLAG = re.compile(r'^--?(verbosity|v)(=|$)')


def fail(message: str) -> None:
  """Ends the program with ``error: message`` as one line on stderr."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def verbose(argv) -> bool:
  """Library logs asked for: ``--verbosity``/``-v`` in ``argv`` or ``GHL_VERBOSE`` true."""
  try:
    wanted = common.parse_bool(os.environ.get('GHL_VERBOSE', '0'), 'GHL_VERBOSE')
  except ValueError as error:
    fail(str(error))
  return wanted or any(VERBOSITY_FLAG.match(arg) for arg in argv[1:])


def config_file(argv):
  """FILE of the last ``--config=FILE[:ARG]`` (or ``--config FILE[:ARG]``) in ``argv``, else None."""
  path = None
  for i, arg in enumerate(argv[1:], 1):
    match = CONFIG_FLAG.match(arg)
    if match:
      value = arg[match.end():] if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
      path = value.split(':', 1)[0]
  return path


def causes(error: BaseException) -> list:
  """``error`` and the exceptions it was raised from, outermost first."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def one_line(error: BaseException) -> str:
  """The first message along ``error``'s causes that fits on one line (flags and ml_collections
  wrap a config file's error in its traceback)."""
  text = next((t for t in (str(e).strip() for e in causes(error)) if t and '\n' not in t), '')
  return text or str(causes(error)[-1]).strip().split('\n', 1)[0] or type(error).__name__


def unknown_field(error: BaseException, argv) -> str:
  """The line for a ``--config.FIELD`` override naming no field (ml_collections raises the key)."""
  chain = causes(error)
  key = str(chain[-1].args[0]) if chain[-1].args else ''
  for arg in argv[1:]:
    match = OVERRIDE_FLAG.match(arg)
    if key and match and key in match.group(2).split('.'):
      texts = (e.args[0] for e in chain if e.args and isinstance(e.args[0], str))
      hint = next((line for text in texts for line in text.split('\n') if line.startswith('Did you mean')), '')
      return f'--config.{match.group(2)}: the config has no field {key!r}; check the name. {hint}'.strip()
  return one_line(error)


def parse_flags(argv):
  """absl's flag parsing, where a bad command line ends in one line; library logs at WARNING
  unless :func:`verbose`."""
  silent = not verbose(argv)
  if silent:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # read by XLA's C++ logging when jax loads, in main
  path = config_file(argv)
  if path is not None and not os.path.isfile(path):
    fail(f'--config file {path!r} not found; give a config file, e.g. experiments/configs/quickstart.py.')
  try:
    rest = FLAGS(argv)
  except (AttributeError, KeyError) as error:
    fail(unknown_field(error, argv))
  except (flags.Error, OSError, TypeError, ValueError) as error:
    fail(one_line(error))
  if len(rest) > 1:
    fail(f'Unexpected arguments: {" ".join(rest[1:])}; write flags as --name=value.')
  if silent:
    logging.set_verbosity(logging.WARNING)   # absl would raise it to INFO
  return rest


def main(argv):
  del argv                                  # checked by parse_flags
  # jax, orbax and tfds load here, after the command line is checked; their start-up lines are
  # filtered unless absl logs INFO (verbosity >= 0: asked for).
  with quiet.stderr_filtered() if FLAGS.verbosity < 0 else contextlib.nullcontext():
    from ghl_jax import train               # pylint: disable=import-outside-toplevel
    from ghl_jax.train import data, distributed, validate  # pylint: disable=import-outside-toplevel
  distributed.initialize(FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (validate.ConfigError, data.DatasetMissingError, train.NumericalError) as error:
    fail(str(error))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
