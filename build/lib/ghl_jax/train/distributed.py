"""Multi-host start-up: ``jax.distributed.initialize()`` only when the run spans several processes."""
from __future__ import annotations

import os

import jax

_MULTI_HOST_HINTS = ('GHL_MULTIHOST', 'JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS')


def initialize() -> None:
  """Joins the multi-controller runtime when launched on several hosts.

  ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` are passed explicitly;
  under SLURM or with ``GHL_MULTIHOST=1`` (TPU VM slices) JAX discovers them. On one host
  nothing happens. CPU runs use
  gloo collectives.
  """
  env = os.environ
  if not any(env.get(key) for key in _MULTI_HOST_HINTS):
    return
  if env.get('SLURM_NTASKS') == '1' and not env.get('JAX_COORDINATOR_ADDRESS'):
    return
  if env.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
