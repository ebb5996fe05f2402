#!/usr/bin/env bash
# Main job: DeepHebb (width 1/4) on Fashion-MNIST trained with GHL and with end-to-end BP,
# then both test accuracies, training curves and receptive fields.
# Usage: bash launch/quickstart.sh [WORKDIR]     (default: workdirs/quickstart; resumes if present)
# Env: QUICKSTART_STEPS (default 600) trades time for accuracy; GHL_VERBOSE=1 shows the
#      libraries' INFO logs (XLA, absl/orbax/tfds), which are off by default.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${GHL_VERBOSE:-0}" = 1 ]; then
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-0}"
fi
source launch/setup_env.sh
WORKDIR="${1:-workdirs/quickstart}"
STEPS="${QUICKSTART_STEPS:-600}"
DATA_DIR="${TFDS_DATA_DIR:-$PWD/tfds_data}"
export TFDS_DATA_DIR="$DATA_DIR"
mkdir -p "$WORKDIR"

# Library C++ INFO/WARNING lines off unless GHL_VERBOSE=1 (experiments/main.py does the same).
quiet() {
  if [ "${GHL_VERBOSE:-0}" = 1 ]; then "$@"; else "$@" 2> >(python -m experiments.quiet >&2); fi
}

# Fashion-MNIST: already imported; else from Debian's package dataset-fashion-mnist (installed with
# apt-get where this runs as root); else downloaded from the address tfds uses, when online.
DEBIAN_COPY=/usr/share/datasets/fashion-mnist
if ! python -m ghl_jax.train.data.offline fashion_mnist --data_dir "$DATA_DIR" --check >/dev/null 2>&1; then
  if [ ! -d "$DEBIAN_COPY" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[quickstart] installing Debian's dataset-fashion-mnist (log: $WORKDIR/apt.log)"
    if ! { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } >"$WORKDIR/apt.log" 2>&1; then
      echo "[quickstart] apt-get could not install dataset-fashion-mnist (log: $WORKDIR/apt.log); trying the download"
    fi
  fi
  if [ -d "$DEBIAN_COPY" ]; then
    quiet python -m ghl_jax.train.data.offline fashion_mnist --source "$DEBIAN_COPY" --data_dir "$DATA_DIR"
  elif ! quiet python -m ghl_jax.train.data.offline fashion_mnist --download --data_dir "$DATA_DIR"; then
    echo "[quickstart] Fashion-MNIST is not available: install Debian's package (sudo apt-get install dataset-fashion-mnist) or go online." >&2
    exit 1
  fi
fi

for METHOD in ghl bp; do
  echo "[quickstart] training DeepHebb with ${METHOD^^} for $STEPS steps"
  python -m experiments.main --config="experiments/configs/quickstart.py:method=$METHOD,steps=$STEPS" \
    --config.data.data_dir="$DATA_DIR" --workdir="$WORKDIR/$METHOD"
done

quiet python - "$WORKDIR" <<'PY'
import sys
from ghl_jax.train import metrics, plots
workdir = sys.argv[1]
runs = {'GHL': f'{workdir}/ghl', 'BP': f'{workdir}/bp'}
print('\n| method | test top-1 (%) | test top-5 (%) |\n|---|---|---|')
for label, path in runs.items():
  last = [r for r in metrics.read(path) if 'eval/top1' in r][-1]
  print(f"| {label} | {100 * last['eval/top1']:.2f} | {100 * last['eval/top5']:.2f} |")
print('\ncurves:', plots.plot_curves(runs, f'{workdir}/curves.png'))
for label, path in runs.items():
  out = plots.plot_fields(plots.latest_params(path)['conv1']['kernel'], f'{path}/receptive_fields.png',
                          f'{label}: conv1 receptive fields')
  print('receptive fields:', out)
PY
