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


@pytest.fixture(scope="session", autouse=True)
def _cache_outside_the_repository(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image caches and data-file digests of the tests (``$MEDPRETRAIN_CACHE``, inherited by the scripts the
    tests start) go to a temporary folder, not into the project's ``runs/cache``."""
    os.environ["MEDPRETRAIN_CACHE"] = str(tmp_path_factory.mktemp("medpretrain-cache"))


def require_module(name: str, hint: str) -> object:
    """Import a test dependency or fail the run with ``hint`` (CI installs everything: a missing one is a
    broken set-up, and a skip would hide every test that needs it)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"test dependency {name!r} is missing ({e}): {hint}", pytrace=False)


# Small on-disk sources for the cache and streaming tests (tests/test_data_cache.py, tests/test_data_stream.py).
DICOM_FILES = {"ct": ["CT_small.dcm", "MR_small.dcm"], "mr": ["MR_small_bigendian.dcm", "emri_small.dcm"]}
"""Real 16-bit pydicom test files (emri_small.dcm has 10 frames) in two class folders."""


def png_folder(root: Path, n: int = 5, size: tuple[int, int] = (20, 24)) -> Path:
    """``n`` random uint8 PNGs of ``size`` in each of two class folders (``benign``, ``malignant``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def dicom_folder(root: Path) -> Path:
    """:data:`DICOM_FILES` copied into class folders under ``root``."""
    import shutil

    from pydicom.data import get_testdata_file

    for c, names in DICOM_FILES.items():
        (root / c).mkdir(parents=True)
        for name in names:
            shutil.copy(get_testdata_file(name), root / c / name)
    return root


@pytest.fixture
def small_cache_chunks(monkeypatch: pytest.MonkeyPatch):
    """Cache chunks of 3 files (so a few test files span several chunks) and no decoded source kept across tests."""
    from medpretrain.data import cache, clear_source_cache

    monkeypatch.setattr(cache, "CHUNK_FILES", 3)
    clear_source_cache()
    yield
    clear_source_cache()
