#!/usr/bin/env bash
# GPU launcher. One host with N GPUs: one process sees all of them (jit over a Mesh).
#   bash launch/gpu.sh --config=experiments/configs/imagenet_resnet50_ghl.py --workdir=runs/r50
# Several nodes: run the same command on every node with
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=<nodes> JAX_PROCESS_ID=<rank>
# or start it under SLURM (srun), where JAX finds the coordinator by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e ".[train]" "jax[cuda12]"
fi
source .venv/bin/activate
if [ -n "${SLURM_PROCID:-}" ] && [ -z "${JAX_PROCESS_ID:-}" ] && [ -n "${JAX_COORDINATOR_ADDRESS:-}" ]; then
  export JAX_PROCESS_ID="$SLURM_PROCID" JAX_NUM_PROCESSES="$SLURM_NTASKS"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m experiments.main "$@"
