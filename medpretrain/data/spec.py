"""Dataset spec strings: one string per dataset, accepted by every stage (``DataConfig.dataset``).

Grammar (relative paths resolve against the data root, ``cfg.root`` or
:func:`medpretrain.utils.default_data_root`):

* ``medmnist:<name>[@<size>]`` - a MedMNIST v2 2D ``.npz`` (``size`` in 28, 64, 128, 224);
* ``folder:<path>`` - a folder of images (class per sub-folder, or unlabeled), or a CSV manifest;
* ``segpairs:<images>,<masks>[,<roi>]`` - image / mask (/ region-of-interest) folders paired by file stem;
* ``drive:[<path>]`` - the DRIVE retinal vessel layout (default ``<root>/drive``);
* ``dicom:<path>`` / ``nifti:<path>`` - read by :mod:`medpretrain.data.dicom` / :mod:`medpretrain.data.nifti`.

Paths cannot contain commas in ``segpairs`` (the separator). Parsing never touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medpretrain.config import DataConfig
from medpretrain.data.errors import DataError
from medpretrain.utils import default_data_root

Scheme = Literal["medmnist", "folder", "segpairs", "drive", "dicom", "nifti"]
SCHEMES: tuple[str, ...] = ("medmnist", "folder", "segpairs", "drive", "dicom", "nifti")
MEDMNIST_SIZES: tuple[int, ...] = (28, 64, 128, 224)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec. ``paths`` are absolute; ``name``/``size`` are set for ``medmnist`` only."""

    scheme: Scheme
    text: str
    paths: tuple[Path, ...] = ()
    name: str | None = None
    size: int | None = None


def data_root(cfg: DataConfig) -> Path:
    """The data root of ``cfg``: ``cfg.root`` if set, else :func:`default_data_root` (absolute)."""
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    return root.resolve()


def resolve_path(text: str, root: Path) -> Path:
    """``text`` as an absolute path: ``~`` expanded, relative paths joined onto ``root``."""
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else root / p


def parse_spec(spec: str, root: Path) -> DatasetSpec:
    """Parse ``spec`` (see the module docstring). Raises :class:`DataError` naming the spec when invalid."""
    text = spec.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.strip().lower()
    if not sep or scheme not in SCHEMES:
        raise DataError(spec, f"unknown dataset spec; expected one of {', '.join(s + ':' for s in SCHEMES)}")
    rest = rest.strip()
    if scheme == "medmnist":
        name, at, size_text = rest.partition("@")
        name = name.strip().lower()
        if not name:
            raise DataError(spec, "medmnist spec needs a name, e.g. medmnist:pneumoniamnist")
        size: int | None = None
        if at:
            if not size_text.strip().isdigit() or int(size_text) not in MEDMNIST_SIZES:
                raise DataError(spec, f"MedMNIST size must be one of {MEDMNIST_SIZES}, got {size_text!r}")
            size = int(size_text)
        return DatasetSpec("medmnist", text, name=name, size=size)
    if scheme == "drive":
        return DatasetSpec("drive", text, paths=(resolve_path(rest or "drive", root),))
    if scheme == "segpairs":
        parts = [p for p in rest.split(",")]
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise DataError(spec, "segpairs spec needs segpairs:<images>,<masks>[,<roi>]")
        return DatasetSpec("segpairs", text, paths=tuple(resolve_path(p, root) for p in parts))
    if not rest:
        raise DataError(spec, f"{scheme} spec needs a path, e.g. {scheme}:my_data")
    return DatasetSpec(scheme, text, paths=(resolve_path(rest, root),))  # type: ignore[arg-type]
