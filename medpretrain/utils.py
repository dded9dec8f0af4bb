"""Small shared helpers: atomic writes, seeding, hashing, paths, versions."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` atomically.

    A crash or kill mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: Sequence[str | os.PathLike[str]], digests: Mapping[str, str] | None = None) -> str:
    """Fingerprint of a dataset: sha256 over (file name, content sha256) of each file, in path order.

    Content is hashed (not mtimes) so copies of the same data on two machines agree. ``digests`` (path as
    ``str`` -> full hex sha256) supplies digests already computed, so those files are not read again; the
    value is the same either way.
    """
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        h.update(Path(p).name.encode())
        h.update((digests[p] if digests is not None and p in digests else sha256_file(p)).encode())
    return h.hexdigest()[:16]


def default_data_root() -> Path:
    """``$MEDPRETRAIN_DATA`` if set, else ``../shared/data`` beside the project, else ``./data``."""
    env = os.environ.get("MEDPRETRAIN_DATA")
    if env:
        return Path(env).expanduser()
    shared = PROJECT_ROOT.parent / "shared" / "data"
    if shared.exists():
        return shared
    return PROJECT_ROOT / "data"


@functools.cache
def code_version() -> str:
    """Package version plus the git commit (``+dirty`` when the tree has changes), if available: computed once
    per process, so a long run (an experiment, a grid run in-process) records the code it started with, not a
    later HEAD of the working tree."""
    from medpretrain import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not sha:
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"


def resolve_inside(base: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """Join ``relative`` onto ``base`` and refuse results outside ``base`` (``..`` or absolute paths).

    Used for every output path that comes from a config, so a config cannot write elsewhere.
    """
    base_p = Path(base).resolve()
    out = (base_p / relative).resolve()
    if out != base_p and base_p not in out.parents:
        raise ValueError(f"output path {relative!s} escapes the output directory {base_p}")
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :func:`platform.processor` says, for benchmark and
    experiment reports."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
