#!/usr/bin/env bash
# The CPU Transformer study: every CIFAR-10 ViT config × seeds, one run at a time, then the table
# and curves from the results report.
#   bash benchmarks/vit_study.sh [ROOT=workdirs/vit] [SEEDS=0,1,2] [STEPS=400]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-workdirs/vit}"; SEEDS="${2:-0,1,2}"; STEPS="${3:-400}"
for name in ghl_attn_mlp ghl_mlp ghl_patch bp bp_adamw signsgd; do
  for seed in ${SEEDS//,/ }; do
    workdir="$ROOT/$name/seed$seed"
    echo "[vit_study] $name seed $seed -> $workdir"
    python -m experiments.main --config="experiments/configs/cifar10_vit_$name.py" --workdir="$workdir" \
      --config.seed="$seed" --config.num_train_steps="$STEPS" --config.eval_every_steps="$((STEPS / 2))"
  done
done
python -m experiments.report "$ROOT"/*/seed* --markdown --plot benchmarks/figures/vit_curves.png
