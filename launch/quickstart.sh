#!/usr/bin/env bash
# Main job: DeepHebb (width 1/4) on Fashion-MNIST trained with GHL and with end-to-end BP,
# then both test accuracies, training curves and receptive fields.
# Usage: bash launch/quickstart.sh [WORKDIR]     (default: workdirs/quickstart; resumes if present)
# Env: QUICKSTART_STEPS (default 600) trades time for accuracy; GHL_VERBOSE=1 shows the
#      libraries' INFO logs (TensorFlow, absl/orbax/tfds), which are off by default.
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

# TensorFlow's start-up INFO lines off unless GHL_VERBOSE=1 (experiments/main.py does the same).
quiet() {
  if [ "${GHL_VERBOSE:-0}" = 1 ]; then "$@"; else "$@" 2> >(python -m experiments.quiet >&2); fi
}

# Fashion-MNIST: already imported, else tfds download when online, else Debian's package.
if ! python -m ghl_jax.train.data.offline fashion_mnist --data_dir "$DATA_DIR" --check 2>/dev/null; then
  # Online only if the host tfds downloads Fashion-MNIST from answers within 3 s.
  if python - >/dev/null 2>&1 <<'PY'
import socket, urllib.parse
from tensorflow_datasets.image_classification import mnist
url = urllib.parse.urlparse(mnist.FashionMNIST.URL)
socket.create_connection((url.hostname, url.port or 80), timeout=3).close()
PY
  then
    online=1
  else
    online=0
    echo "[quickstart] the Fashion-MNIST host of tfds is not reachable: using the offline copy"
  fi
  if [ "$online" = 1 ] && echo "[quickstart] downloading Fashion-MNIST with tfds (log: $WORKDIR/tfds_download.log)" &&
     python -c "import tensorflow_datasets as t; t.builder('fashion_mnist', data_dir='$DATA_DIR').download_and_prepare()" \
       >"$WORKDIR/tfds_download.log" 2>&1; then
    echo "[quickstart] Fashion-MNIST downloaded by tfds into $DATA_DIR"
  else
    [ "$online" = 1 ] && echo "[quickstart] tfds could not download Fashion-MNIST; trying Debian's dataset-fashion-mnist"
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        if ! { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } >"$WORKDIR/apt.log" 2>&1; then
          echo "[quickstart] apt-get could not install dataset-fashion-mnist (log: $WORKDIR/apt.log)" >&2
        fi
      fi
    fi
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
      echo "[quickstart] Fashion-MNIST is not available offline: install Debian's package (sudo apt-get install dataset-fashion-mnist) or go online." >&2
      exit 1
    fi
    quiet python -m ghl_jax.train.data.offline fashion_mnist --source /usr/share/datasets/fashion-mnist --data_dir "$DATA_DIR"
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
