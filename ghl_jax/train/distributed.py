"""Multi-host start-up: ``jax.distributed.initialize()`` only when the run spans several processes."""
from __future__ import annotations

import os

import jax

_MULTI_HOST_HINTS = ('GHL_MULTIHOST', 'JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS')


def initialize(config=None) -> None:
  """Joins the multi-controller runtime when launched on several hosts.

  ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` are passed explicitly;
  under SLURM or with ``GHL_MULTIHOST=1`` (TPU VM slices) JAX discovers them. On one host
  nothing happens. CPU runs use gloo collectives.

  ``config.watchdog.heartbeat_s`` / ``shutdown_s`` (when ``config`` is given) go to the distributed
  runtime: a peer silent for ``heartbeat_s`` is declared dead and the runtime ends every other process
  (its own message and an abort; where a collective fails first, the trainer's one line and exit code
  75); an exiting process waits at most ``shutdown_s`` for the others.
  """
  env = os.environ
  if not any(env.get(key) for key in _MULTI_HOST_HINTS):
    return
  if env.get('SLURM_NTASKS') == '1' and not env.get('JAX_COORDINATOR_ADDRESS'):
    return
  if env.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeouts = {}
  dog = config.get('watchdog') if config is not None else None
  if dog is not None:
    timeouts = {'heartbeat_timeout_seconds': int(dog.get('heartbeat_s', 100)),
                'shutdown_timeout_seconds': int(dog.get('shutdown_s', 300))}
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']), **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
