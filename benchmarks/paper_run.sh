#!/usr/bin/env bash
# The paper's CIFAR-10 DeepHebb run, GHL and BP for 100 epochs, in one call on one GPU/TPU
# (benchmarks/paper_run.py): it starts no new epoch after --budget-s (420 s), then evaluates both on
# the 10,000 test images and prints the table; the timeout is the hard stop at 8 minutes.
# Extra arguments go to benchmarks/paper_run.py, e.g. --data DIR --dtype bfloat16 --json out.json;
# --tiny runs the same code at width 1/16 on 1,024 images (also on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
exec timeout --signal=INT --kill-after=15 480 "$PYTHON" -m benchmarks.paper_run "$@"
