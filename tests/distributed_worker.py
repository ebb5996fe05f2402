"""One process of a multi-process run on loopback: ``python distributed_worker.py ID N PORT WORKDIR CONFIG_JSON``.

Each process simulates its devices on the CPU and joins the others through gloo collectives,
exactly as ``launch/`` scripts start processes on several hosts (``ghl_jax.distributed``).
WORKDIR may list several workdirs joined by ``os.pathsep``: they are trained one after the other
by the same processes (one start-up for several runs).

``GHL_TEST_FAULT=PROCESS:stop|kill:STEP`` makes process PROCESS stop itself (SIGSTOP) or die (SIGKILL)
just before it trains step STEP of the last workdir: a deterministic stuck or dead peer. That process
runs with its watchdog off, so that only the waiting process's limits are under test (on a loaded
machine the faulty process could otherwise end itself first, waiting on a slow save of its peer).
"""
import json
import os
import signal
import sys


def inject_fault(spec: str, process_id: int) -> None:
  """Wraps the training batches so that ``spec`` (``PROCESS:stop|kill:STEP``) fires in this process."""
  who, what, step = spec.split(':')
  if int(who) != process_id:
    return
  from ghl_jax.train import data as data_lib  # pylint: disable=import-outside-toplevel
  real, sig = data_lib.train_batches, {'stop': signal.SIGSTOP, 'kill': signal.SIGKILL}[what]

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if kwargs.get('start_step', 0) + i + 1 == int(step):
        os.kill(os.getpid(), sig)
      yield batch
  data_lib.train_batches = batches


def main(process_id, num_processes, port, workdir, config_json):
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if int(num_processes) > 1:
    os.environ.update({'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': num_processes,
                       'JAX_PROCESS_ID': process_id})
  from experiments.configs import common  # pylint: disable=import-outside-toplevel
  from ghl_jax.train import distributed; from ghl_jax import train  # pylint: disable=import-outside-toplevel
  config = common.base()
  config.update_from_flattened_dict(json.loads(config_json))
  fault = os.environ.get('GHL_TEST_FAULT', '')
  if fault.split(':')[0] == str(process_id):
    config.watchdog.enabled = False
  distributed.initialize(config)
  workdirs = workdir.split(os.pathsep)
  for one in workdirs:
    if one == workdirs[-1] and fault:
      inject_fault(fault, int(process_id))
    metrics = train.train_and_evaluate(config, one)
    print('FINAL ' + json.dumps(metrics), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
