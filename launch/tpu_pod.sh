#!/usr/bin/env bash
# TPU VM slice: create (optional), install, and run the same main on every worker.
#   TPU_NAME=ghl-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh create
#   TPU_NAME=ghl-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh run \
#       --config=experiments/configs/imagenet_resnet50_ghl.py --workdir=gs://BUCKET/r50_ghl
# Each worker is one JAX process; jax.distributed discovers the slice from TPU metadata, and each
# process reads its own slice of the data. The workdir must be shared: a gs:// bucket (gcsfs, installed
# by `install`) holds the checkpoints, and process 0 copies its logs up (README, "Train from a config").
# Fault tolerance (README, "Fault tolerance"): as launch/gpu.sh, the watchdog is on
# (--config.watchdog.enabled=False turns it off) and each worker's process is restarted on exit 75
# (or 134, JAX's abort when a peer or the coordinator is gone; GHL_RESTARTS times, default 3), resuming from the last complete checkpoint; on exit 76 (SIGTERM
# without a save) or any other code the worker stops.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO="${REPO:-https://github.com/ghl-jax/ghl_jax.git}"
cmd="${1:?usage: tpu_pod.sh create|install|run [main flags...]}"; shift || true
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "${ACCELERATOR:?set ACCELERATOR, e.g. v4-32}" --version "${TPU_VERSION:-tpu-ubuntu2204-base}";;
  install)
    ssh_all "git clone $REPO ghl_jax 2>/dev/null || git -C ghl_jax pull; cd ghl_jax && python3 -m venv .venv && \
      .venv/bin/pip install -q -e '.[train,gcs]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html";;
  run)                                    # bfloat16 on the TPU unless the command sets compute_dtype
    case " $* " in *" --config.compute_dtype"* | *" -config.compute_dtype"*) ;; *) set -- "$@" --config.compute_dtype=auto ;; esac
    args=$(printf ' %q' "$@")
    ssh_all "cd ghl_jax && GHL_MULTIHOST=1 GHL_RESTARTS=${GHL_RESTARTS:-3} bash launch/restart.sh --watchdog \
      .venv/bin/python -m experiments.main$args";;
  *) echo "unknown command $cmd: use create, install or run" >&2; exit 2;;
esac
