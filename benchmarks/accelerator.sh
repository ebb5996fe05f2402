#!/usr/bin/env bash
# GHL vs backprop on one accelerator: DeepHebb on CIFAR-10 shapes and ResNet-50 on ImageNet
# shapes, float32 and bfloat16, one table (benchmarks/accelerator.py), ending within 8 minutes.
# Extra arguments go to benchmarks/accelerator.py, e.g. --resnet-batch 256 --json out.json;
# --tiny runs the same code paths at tiny shapes (also on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the device high-water mark is then what the steps use
export TF_CPP_MIN_LOG_LEVEL=2
# The script stops starting new models after --budget-s (330 s); the timeout is the hard stop.
exec timeout --signal=INT --kill-after=15 465 "$PYTHON" -m benchmarks.accelerator "$@"
