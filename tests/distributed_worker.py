"""One process of a multi-process run on loopback: ``python distributed_worker.py ID N PORT WORKDIR CONFIG_JSON``.

Each process simulates its devices on the CPU and joins the others through gloo collectives,
exactly as ``launch/`` scripts start processes on several hosts (``ghl_jax.distributed``).
WORKDIR may list several workdirs joined by ``os.pathsep``: they are trained one after the other
by the same processes (one start-up for several runs).
"""
import json
import os
import sys


def main(process_id, num_processes, port, workdir, config_json):
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if int(num_processes) > 1:
    os.environ.update({'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': num_processes,
                       'JAX_PROCESS_ID': process_id})
  from experiments.configs import common  # pylint: disable=import-outside-toplevel
  from ghl_jax.train import distributed; from ghl_jax import train  # pylint: disable=import-outside-toplevel
  distributed.initialize()
  config = common.base()
  config.update_from_flattened_dict(json.loads(config_json))
  for one in workdir.split(os.pathsep):
    metrics = train.train_and_evaluate(config, one)
    print('FINAL ' + json.dumps(metrics), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
