"""Dataset spec strings: one string per dataset, accepted by every stage (``DataConfig.dataset``).

Grammar (relative paths resolve against the data root, ``cfg.root`` or
:func:`medpretrain.utils.default_data_root`):

* ``medmnist:<name>[@<size>]`` - a MedMNIST v2 2D ``.npz`` (``size`` in 28, 64, 128, 224);
* ``folder:<path>`` - a folder of images (class per sub-folder, or unlabeled), or a CSV / TSV manifest;
* ``manifest:<file>`` - a CSV / TSV manifest whose rows point at image, DICOM or NIfTI files
  (:mod:`medpretrain.data.manifest`);
* ``segpairs:<images>,<masks>[,<roi>]`` - image / mask (/ region-of-interest) folders paired by file stem;
* ``drive:[<path>]`` - the DRIVE retinal vessel layout (default ``<root>/drive``);
* ``dicom:<path>`` / ``nifti:<path>`` - read by :mod:`medpretrain.data.dicom` / :mod:`medpretrain.data.nifti`.

Each scheme is an entry of :data:`medpretrain.data.readers.READERS`, which also holds its grammar. Paths
cannot contain commas in ``segpairs`` (the separator). Parsing never touches the disk.
"""

from __future__ import annotations

from pathlib import Path

from medpretrain.config import DataConfig
from medpretrain.data.base import DatasetSpec
from medpretrain.data.readers import MEDMNIST_SIZES, READERS, get_reader, resolve_path
from medpretrain.utils import default_data_root

__all__ = ["MEDMNIST_SIZES", "SCHEMES", "DatasetSpec", "data_root", "parse_spec", "resolve_path"]

SCHEMES: tuple[str, ...] = tuple(READERS)


def data_root(cfg: DataConfig) -> Path:
    """The data root of ``cfg``: ``cfg.root`` if set, else :func:`default_data_root` (absolute)."""
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    return root.resolve()


def parse_spec(spec: str, root: Path) -> DatasetSpec:
    """Parse ``spec`` (see the module docstring). Raises :class:`DataError` naming the spec when invalid."""
    text = spec.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.strip().lower()
    reader = get_reader(scheme if sep else "", spec)
    return reader.parse(text, scheme, rest.strip(), root)
