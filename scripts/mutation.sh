#!/usr/bin/env bash
# Mutation testing of the numerical core (issue 20): mutmut mutates the modules listed under
# [tool.mutmut] in pyproject.toml and runs their unit tests against each mutant, then
# benchmarks/mutation_report.py writes benchmarks/results/mutation.md (killed / survived / reviewed).
# About 30 min on one core of the 2-core CI machine. Extra arguments go to `mutmut run` (mutant names re-run
# only those, e.g. the survivors after new tests). Run it in a clean worktree of the commit to measure
# (`git worktree add /tmp/mut HEAD`): mutmut writes mutants/ and mutmut-stats.json beside the sources, and the
# report names the commit. Surviving mutants are reviewed in benchmarks/mutation_review.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -L .venv ]; then  # a worktree borrowing another checkout's environment: re-installing the editable
  echo "[mutation] .venv links to another checkout's environment: not re-installing into it"  # package here
else                     # would point that environment at this worktree
  bash scripts/setup.sh
fi
.venv/bin/python -m pip show mutmut >/dev/null 2>&1 || .venv/bin/python -m pip install -q "mutmut>=3.3,<4"
export MEDPRETRAIN_DATA=${MEDPRETRAIN_DATA:-$(cd .. && pwd)/shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/mutmut run "$@" || true   # mutmut exits non-zero when mutants survive; the report says which
.venv/bin/python benchmarks/mutation_report.py
