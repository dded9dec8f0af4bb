"""Outcome rows for ``benchmarks/results/reliability.md`` (no conftest, no fixtures).

Tests of ``tests/test_reliability_*.py`` call :func:`record`; when ``$MEDPRETRAIN_RELIABILITY_LOG`` names
a file (``benchmarks/bench_reliability.py`` sets it), one JSON line per tried fault or input is appended to
it. Without the variable nothing is written. A row is recorded only after its assertions passed, so a
row's ``outcome`` is what the test proved.
"""

from __future__ import annotations

import json
import os


def record(category: str, case: str, outcome: str, **extra: object) -> None:
    """Append ``{"category", "case", "outcome", ...}`` to ``$MEDPRETRAIN_RELIABILITY_LOG`` if it is set."""
    path = os.environ.get("MEDPRETRAIN_RELIABILITY_LOG")
    if not path:
        return
    row = {"category": category, "case": case, "outcome": outcome, **extra}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
