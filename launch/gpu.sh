#!/usr/bin/env bash
# GPU launcher. One host with N GPUs: one process sees all of them (jit over a Mesh).
#   bash launch/gpu.sh --config=experiments/configs/imagenet_resnet50_ghl.py --workdir=runs/r50
# Several nodes: run the same command on every node with
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=<nodes> JAX_PROCESS_ID=<rank>
# or start it under SLURM (srun), where JAX finds the coordinator by itself.
# Installs ghl_jax[train] with the CUDA jaxlib into .venv whenever the venv lacks them, prints the
# GPUs this host will use, and stops with one line when JAX finds none.
# Fault tolerance (README, "Fault tolerance"): the watchdog is on (--config.watchdog.enabled=False
# turns it off); a phase past its timeout or a lost peer ends the process with one line and exit 75,
# and launch/restart.sh restarts it (GHL_RESTARTS times, default 3) from the last complete
# checkpoint; SIGTERM is forwarded: every process saves the same step and stops, or exits 76 after
# config.watchdog.sigterm_grace_s; a peer silent for config.watchdog.heartbeat_s ends the others
# (JAX's abort, exit 134, which launch/restart.sh also restarts in a multi-process run).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c '
import importlib.metadata as m
def has(name):
  try:
    return bool(m.version(name))
  except m.PackageNotFoundError:
    return False
ready = has("ghl_jax") and has("tensorflow-datasets") and (has("jax-cuda12-plugin") or has("jax-cuda13-plugin"))
raise SystemExit(0 if ready else 1)' 2>/dev/null; then
  echo "[gpu] installing ghl_jax[train] with the CUDA jaxlib into .venv"
  .venv/bin/pip install -q -e ".[train]" "jax[cuda12]"
fi
source .venv/bin/activate
if [ -n "${SLURM_PROCID:-}" ] && [ -z "${JAX_PROCESS_ID:-}" ] && [ -n "${JAX_COORDINATOR_ADDRESS:-}" ]; then
  export JAX_PROCESS_ID="$SLURM_PROCID" JAX_NUM_PROCESSES="$SLURM_NTASKS"
fi
gpus="$(XLA_PYTHON_CLIENT_PREALLOCATE=false python -c '
import jax
if jax.default_backend() == "gpu":
  print(jax.local_device_count(), "x", ", ".join(sorted({d.device_kind for d in jax.local_devices()})))
' 2>/dev/null || true)"
if [ -z "$gpus" ]; then
  echo "error: JAX finds no GPU on $(hostname): check nvidia-smi, CUDA_VISIBLE_DEVICES and JAX_PLATFORMS." >&2
  exit 1
fi
echo "[gpu] $(hostname): $gpus"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# Computes in bfloat16 on the GPU (params, optimizer state and Hebbian sums stay float32; README,
# "Speed"), unless the command line sets config.compute_dtype itself.
case " $* " in *" --config.compute_dtype"* | *" -config.compute_dtype"*) ;; *) set -- "$@" --config.compute_dtype=auto ;; esac
exec bash launch/restart.sh --watchdog python -m experiments.main "$@"
