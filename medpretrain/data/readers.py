"""The registry of data formats: one :class:`Reader` per spec scheme, in :data:`READERS`.

The spec parser (:func:`medpretrain.data.spec.parse_spec`), the dataset builder
(:func:`medpretrain.data.read_source`, :func:`medpretrain.data.data_stamp`) and manifests
(:mod:`medpretrain.data.manifest`, which picks a reader per row with :func:`reader_for_file`) read this table
and nothing else. Reader modules are imported on first use, by name, so parsing a spec imports no decoder.

Adding a format is one module and one entry here. The module defines

* ``read_<fmt>_source(<args>, cfg, skips) -> Source``: a ``<scheme>:<path>`` spec (``args`` of the entry
  turns the parsed spec into ``<args>``; by default its one path);
* optionally ``decode_<fmt>_file(path, cfg, rel) -> Decoded``: the samples of one file (``rel`` is the path as
  its source knows it, for hashed group keys), which lets manifest rows point at the format; the entry then
  names the file ``suffixes`` and ``magic`` bytes that select it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpretrain.data.base import DatasetSpec, Decoded, Source, decode_file
from medpretrain.data.errors import DataError

if TYPE_CHECKING:
    from medpretrain.config import DataConfig
    from medpretrain.data.errors import SkipLog

MEDMNIST_SIZES: tuple[int, ...] = (28, 64, 128, 224)
HEAD_BYTES = 348
"""Bytes read from a file's start to recognise its format (a NIfTI-1 header is 348 bytes)."""


def resolve_path(text: str, root: Path) -> Path:
    """``text`` as an absolute path: ``~`` expanded, relative paths joined onto ``root``."""
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else root / p


def parse_path(text: str, scheme: str, rest: str, root: Path) -> DatasetSpec:
    """``<scheme>:<path>``: one path, required."""
    if not rest:
        raise DataError(text, f"{scheme} spec needs a path, e.g. {scheme}:my_data")
    return DatasetSpec(scheme, text, paths=(resolve_path(rest, root),), root=root)


def _parse_medmnist(text: str, scheme: str, rest: str, root: Path) -> DatasetSpec:
    name, at, size_text = rest.partition("@")
    name = name.strip().lower()
    if not name:
        raise DataError(text, "medmnist spec needs a name, e.g. medmnist:pneumoniamnist")
    size: int | None = None
    if at:
        if not size_text.strip().isdigit() or int(size_text) not in MEDMNIST_SIZES:
            raise DataError(text, f"MedMNIST size must be one of {MEDMNIST_SIZES}, got {size_text!r}")
        size = int(size_text)
    return DatasetSpec(scheme, text, name=name, size=size, root=root)


def _parse_segpairs(text: str, scheme: str, rest: str, root: Path) -> DatasetSpec:
    parts = rest.split(",")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise DataError(text, "segpairs spec needs segpairs:<images>,<masks>[,<roi>]")
    return DatasetSpec(scheme, text, paths=tuple(resolve_path(p, root) for p in parts), root=root)


def _parse_drive(text: str, scheme: str, rest: str, root: Path) -> DatasetSpec:
    return DatasetSpec(scheme, text, paths=(resolve_path(rest or "drive", root),), root=root)


def _one_path(spec: DatasetSpec) -> tuple[Any, ...]:
    return (spec.paths[0],)


@dataclass(frozen=True)
class Reader:
    """One data format (see the module docstring).

    scheme: the spec prefix (``dicom`` in ``dicom:<path>``). module: the reader module, imported on first use.
    read_source: name of its ``read_..._source`` function, called as ``fn(*args(spec), cfg, skips)``.
    parse: ``(text, scheme, rest, root) ->
    DatasetSpec`` for the part after ``<scheme>:`` (default: one path). decode_file: name of its per-file
    decoder (``None``: manifest rows cannot point at this format). suffixes / magic: file-name endings and
    ``(offset, bytes)`` signatures that pick this reader for a manifest row. source_files: name of a
    ``fn(spec, cfg) -> list[Path]`` listing the files behind a spec for :func:`medpretrain.data.data_stamp`
    (``None``: the files under the spec's paths). cacheable: its ``read_source`` decodes every file through
    :func:`medpretrain.data.base.decode_file`, so ``data.cache`` can keep its images on disk
    (:mod:`medpretrain.data.cache`).
    """

    scheme: str
    module: str
    read_source: str
    parse: Callable[[str, str, str, Path], DatasetSpec] = parse_path
    args: Callable[[DatasetSpec], tuple[Any, ...]] = _one_path
    decode_file: str | None = None
    suffixes: tuple[str, ...] = ()
    magic: tuple[tuple[int, bytes], ...] = ()
    source_files: str | None = None
    cacheable: bool = False

    def _function(self, name: str) -> Callable[..., Any]:
        fn: Callable[..., Any] = getattr(importlib.import_module(self.module), name)
        return fn

    def read(self, spec: DatasetSpec, cfg: DataConfig, skips: SkipLog) -> Source:
        """The :class:`Source` of ``spec`` (whose scheme is this reader's)."""
        source: Source = self._function(self.read_source)(*self.args(spec), cfg, skips)
        return source

    def decode(self, path: Path, cfg: DataConfig, rel: str) -> Decoded:
        """The samples of one file of this format. Raises DataError naming the file; ValueError when the
        format has no per-file decoder."""
        if self.decode_file is None:
            raise ValueError(f"reader {self.scheme!r} has no per-file decoder")
        decoded: Decoded = decode_file(self._function(self.decode_file), path, cfg, rel)
        return decoded

    def files(self, spec: DatasetSpec, cfg: DataConfig) -> list[Path] | None:
        """The files behind ``spec`` from the reader's ``source_files`` function; ``None`` when it has none."""
        return self._function(self.source_files)(spec, cfg) if self.source_files else None


IMAGE_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x89PNG\r\n\x1a\n"), (0, b"\xff\xd8\xff"), (0, b"II*\x00"), (0, b"MM\x00*"), (0, b"GIF87a"),
    (0, b"GIF89a"), (0, b"BM"),
)
# DICOM Part 10 carries "DICM" at byte 128; a data set saved without the preamble starts with its file meta
# group (0002,0000) or, without meta, usually with group 0008.
DICOM_MAGIC: tuple[tuple[int, bytes], ...] = ((128, b"DICM"), (0, b"\x02\x00\x00\x00"), (0, b"\x08\x00"))
NIFTI_MAGIC: tuple[tuple[int, bytes], ...] = ((344, b"n+1\x00"), (4, b"n+2\x00"))

READERS: dict[str, Reader] = {r.scheme: r for r in (
    Reader("medmnist", "medpretrain.data.medmnist", "read_medmnist_source",
           parse=_parse_medmnist, args=lambda s: (s.name, s.size, s.root), source_files="medmnist_files"),
    Reader("folder", "medpretrain.data.folder", "read_folder_source",
           decode_file="decode_image_file", suffixes=(".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"),
           magic=IMAGE_MAGIC, cacheable=True),
    Reader("manifest", "medpretrain.data.manifest", "read_manifest_source", cacheable=True),
    Reader("segpairs", "medpretrain.data.segpairs", "read_segpairs_source",
           parse=_parse_segpairs, args=lambda s: (s.paths[0], s.paths[1], s.paths[2] if len(s.paths) > 2 else None)),
    Reader("drive", "medpretrain.data.segpairs", "read_drive_source", parse=_parse_drive),
    Reader("dicom", "medpretrain.data.dicom", "read_dicom_source",
           decode_file="decode_dicom_file", suffixes=(".dcm", ".dicom", ".dic"), magic=DICOM_MAGIC,
           cacheable=True),
    Reader("nifti", "medpretrain.data.nifti", "read_nifti_source",
           decode_file="decode_nifti_file", suffixes=(".nii", ".nii.gz"), magic=NIFTI_MAGIC,
           cacheable=True),
)}
"""Every format, by scheme (the order of error messages)."""


def get_reader(scheme: str, spec: str = "") -> Reader:
    """The reader of ``scheme``; DataError naming ``spec`` (or the scheme) and the known schemes otherwise."""
    reader = READERS.get(scheme)
    if reader is None:
        raise DataError(spec or scheme, f"unknown dataset spec; expected one of "
                                        f"{', '.join(s + ':' for s in READERS)}")
    return reader


def file_readers() -> list[Reader]:
    """The readers that decode single files (manifest rows), in registry order."""
    return [r for r in READERS.values() if r.decode_file is not None]


def reader_for_file(path: Path) -> Reader | None:
    """The reader of one file: the one whose magic bytes match its content (the match furthest into the file,
    then registry order), else the longest matching suffix; ``None`` when neither says. Raises DataError naming
    the file when it cannot be opened."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or type(e).__name__})") from None
    readers = file_readers()
    # The signature found furthest into the file wins: a DICOM preamble (bytes 0-127, before "DICM") may carry
    # another format's header, e.g. a TIFF one in dual-personality files such as pydicom-data's US1_UNCR.dcm.
    found = [(at, -k, r) for k, r in enumerate(readers) for at, sig in r.magic if head[at:at + len(sig)] == sig]
    if found:
        return max(found, key=lambda x: (x[0], x[1]))[2]
    name = path.name.lower()
    by_suffix = [(len(s), r) for r in readers for s in r.suffixes if name.endswith(s)]
    return max(by_suffix, key=lambda x: x[0])[1] if by_suffix else None
