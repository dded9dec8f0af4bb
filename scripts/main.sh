#!/usr/bin/env bash
# The main job on the default dataset (PneumoniaMNIST 28 px), from a fresh machine:
#   1. set up .venv (torch, torchvision, medpretrain) if needed;
#   2. python scripts/run_experiment.py configs/experiments/default.yaml: SimCLR pretraining (3 epochs,
#      ResNet-18, standard stem) -> the fine-tune grid scratch vs SimCLR vs ImageNet (linear probe and full
#      fine-tuning, 5 % and 25 % of the labels, 2 seeds) -> runs/experiments/default/report.md, which says
#      which init to use at each label budget and how sure that is, with the full grid report and plots
#      under runs/experiments/default/reports/classification/.
# Extra arguments go to scripts/run_experiment.py (e.g. dry_run=true). A second run reuses every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Threads sleep instead of spinning while they wait: on a shared or small CPU spinning made small ops
# up to 20x slower (measured in benchmarks/results/pretrain.md); an explicit value wins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MEDPRETRAIN_DATA=${MEDPRETRAIN_DATA:-$(cd .. && pwd)/shared/data}
start=$(date +%s)
.venv/bin/python scripts/run_experiment.py configs/experiments/default.yaml "$@"
echo "[main] finished in $(( $(date +%s) - start )) s; report: runs/experiments/default/report.md"
