#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Threads sleep instead of spinning while they wait: on a shared or small CPU spinning made small ops
# up to 20x slower (measured in benchmarks/results/pretrain.md); an explicit value wins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MEDPRETRAIN_DATA=${MEDPRETRAIN_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check medpretrain pretrain finetune generative scripts tests
.venv/bin/mypy  # medpretrain/ ([tool.mypy] in pyproject.toml): clean since 2026-12-02
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
