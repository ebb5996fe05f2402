#!/usr/bin/env bash
# TPU VM slice: create (optional), install, and run the same main on every worker.
#   TPU_NAME=ghl-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh create
#   TPU_NAME=ghl-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh run \
#       --config=experiments/configs/imagenet_resnet50_ghl.py --workdir=gs://BUCKET/r50_ghl
# Each worker is one JAX process; jax.distributed discovers the slice from TPU metadata, and each
# process reads its own slice of the data. The workdir must be shared (a GCS bucket).
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
      .venv/bin/pip install -q -e '.[train]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html";;
  run)
    args=$(printf ' %q' "$@")
    ssh_all "cd ghl_jax && GHL_MULTIHOST=1 .venv/bin/python -m experiments.main$args";;
  *) echo "unknown command $cmd: use create, install or run" >&2; exit 2;;
esac
