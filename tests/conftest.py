"""Shared fixtures. Real data lives outside the repository (``../shared/data`` or ``$MEDPRETRAIN_DATA``)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data folder: ``$MEDPRETRAIN_DATA``, else ``<repo>/../shared/data``. Fails (never skips) if missing."""
    env = os.environ.get("MEDPRETRAIN_DATA")
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.fail(f"real test data not found at {root}: set MEDPRETRAIN_DATA to the shared data folder "
                    "(see ../shared/data/README.md)")
    return root


def require_module(name: str, hint: str) -> object:
    """Import a test dependency or fail the run with ``hint`` (CI installs everything: a missing one is a
    broken set-up, and a skip would hide every test that needs it)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"test dependency {name!r} is missing ({e}): {hint}", pytrace=False)
