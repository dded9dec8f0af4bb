#!/usr/bin/env bash
# The main job on the default dataset (PneumoniaMNIST 28 px), from a fresh machine:
#   1. set up .venv (torch, torchvision, medpretrain) if needed;
#   2. self-supervised pretraining (SimCLR, configs/simclr.yaml; 3 epochs, ResNet-18 with the standard stem,
#      which is about 5x cheaper than the small stem at 28 px) -> runs/pretrain/simclr/<time>/backbone.safetensors;
#   3. the fine-tune comparison grid scratch vs selfsup vs imagenet (configs/compare.yaml)
#      -> runs/reports/default/report.md with its plots.
# Extra arguments are passed to scripts/compare.py (e.g. seeds='[0,1,2]').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Threads sleep instead of spinning while they wait: on a shared or small CPU spinning made small ops
# up to 20x slower (measured in benchmarks/results/pretrain.md); an explicit value wins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MEDPRETRAIN_DATA=${MEDPRETRAIN_DATA:-$(cd .. && pwd)/shared/data}
start=$(date +%s)
echo "[main] 1/2 SimCLR pretraining on PneumoniaMNIST (configs/simclr.yaml)"
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  pretrain/simclr.py --config configs/simclr.yaml backbone.stem=standard train.epochs=3
echo "[main] 2/2 fine-tune comparison grid (configs/compare.yaml)"
.venv/bin/python scripts/compare.py --config configs/compare.yaml "$@"
echo "[main] finished in $(( $(date +%s) - start )) s; report: runs/reports/default/report.md"
