"""Trains a config: ``python -m experiments.main --config=experiments/configs/NAME.py --workdir=DIR``.

Any field can be overridden, e.g. ``--config.batch_size=128 --config.model.name=fasthebb``;
``--config=...py:runlocal`` shrinks the run for a laptop. On several hosts, set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run under
SLURM / on a TPU VM slice, where they are discovered) and start the same command on every host.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ghl_jax.train import distributed
from ghl_jax import train
from ghl_jax.train.data import DatasetMissingError
from ghl_jax.train.validate import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics (resumed if present).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  distributed.initialize()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DatasetMissingError, train.NumericalError) as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
