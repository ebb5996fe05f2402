#!/usr/bin/env bash
# The paper's claim at a real horizon on CPU: CIFAR-10 DeepHebb (full width, the paper's recipe:
# batch 64, two-group SGD, cosine over the run, no augmentation), GHL then BP, each EPOCHS epochs,
# every epoch evaluated on all 10,000 test images, gradient alignment logged every 50 steps (in the BP
# run: what GHL would have done, config.ghl.shadow).
#
#   bash benchmarks/horizon.sh ROOT [CIFAR10_NPZ_DIR]
#
# ROOT holds the tfds data dir and both workdirs; put it outside the checkout, in a folder that
# outlives the session. Run it again to resume: each run continues from its last checkpoint, a
# finished run is skipped. CIFAR10_NPZ_DIR defaults to the shared offline copy beside the repo.
# Env: EPOCHS (10), DTYPE (bfloat16 where the CPU has bf16 instructions, else float32), NICE (19:
# the run takes only the cycles other work leaves; set on the session's autogroup too, where the
# kernel groups processes by session and nice alone would not yield). At the end: the report table
# and curves, and benchmarks.horizon_table's per-epoch, pace and alignment tables.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "error: give the root folder of the runs: bash benchmarks/horizon.sh ROOT [CIFAR10_NPZ_DIR]" >&2
  exit 2
fi
ROOT="$1"
SOURCE="${2:-../shared/data/cifar10}"
EPOCHS="${EPOCHS:-10}"
if grep -q -m1 -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo 2>/dev/null; then default_dtype=bfloat16; else default_dtype=float32; fi
DTYPE="${DTYPE:-$default_dtype}"
source launch/setup_env.sh
# Under autogroup scheduling a process's nice only ranks it within its session; the group's own nice
# ranks the session against the others (a run started with setsid is a session of its own).
echo "${NICE:-19}" 2>/dev/null > /proc/self/autogroup || true
mkdir -p "$ROOT"
DATA_DIR="$ROOT/tfds_data"
if ! python -m ghl_jax.train.data.offline cifar10 --data_dir "$DATA_DIR" --check 2>/dev/null; then
  python -m ghl_jax.train.data.offline cifar10 --source "$SOURCE" --data_dir "$DATA_DIR"
fi
for METHOD in ghl bp; do
  echo "[horizon] $METHOD: $EPOCHS epochs in $DTYPE, workdir $ROOT/$METHOD ($(date -u +%H:%M))"
  shadow=()                                  # the BP run also logs what GHL would have done
  if [ "$METHOD" = bp ]; then shadow=(--config.ghl.shadow=True); fi
  nice -n "${NICE:-19}" python -m experiments.main --config="experiments/configs/cifar10_deephebb_$METHOD.py" \
    --workdir="$ROOT/$METHOD" --config.data.data_dir="$DATA_DIR" --config.num_epochs="$EPOCHS" \
    --config.compute_dtype="$DTYPE" --config.log_every_steps=50 --config.eval_every_steps=-1 \
    --config.checkpoint_every_steps=250 "${shadow[@]}"
done
python -m experiments.report "$ROOT/ghl" "$ROOT/bp" --markdown --plot "$ROOT/horizon.png"
python -m benchmarks.horizon_table "$ROOT"
