"""``manifest:<file>`` (also ``folder:<file.csv>``): a CSV / TSV / Parquet table, one row per file, of any format.

Columns (names set in :class:`medpretrain.config.DataConfig`; header names are stripped, other columns are
ignored; ``.tsv`` / ``.tab`` files are tab-separated, ``.csv`` comma-separated, ``.parquet`` / ``.pq`` read
with pyarrow, the ``parquet`` extra, each cell as the text a CSV of the same table would hold):

* ``data.path_column`` (``image_path``): the file, relative to the manifest's folder or absolute. Its format
  comes from the reader registry (:func:`medpretrain.data.readers.reader_for_file`): content signature first
  (PNG / JPEG / TIFF / GIF / BMP, DICOM, NIfTI), then the file suffix. Each file is decoded exactly as its
  own reader does (``folder:``, ``dicom:``, ``nifti:``): a DICOM file gives one sample per frame, a NIfTI
  volume one per non-empty slice, all with the row's label.
* ``data.label_column`` (``label``): class names (sorted, or ``data.classes`` in that order), or, when
  every label is an integer, class indices that must lie in ``0..K-1`` for ``K`` distinct labels. Without
  the column (at its default name) the manifest is unlabeled.
* ``data.label_columns``: several columns, each 0 or 1 (``0``, ``1``, ``0.0``, ``1.0``, ``true``,
  ``false``): a float32 multi-hot label vector in the order given, task ``multilabel``.
* ``data.patient_column`` (``patient``): one patient / subject never spans two splits. Only a salted key of
  the value is kept (:func:`medpretrain.data.privacy.salted_key`, the same key as a DICOM PatientID); the
  value itself is never stored, logged or put in an error. An empty cell falls back to the key the file
  gives (a DICOM file's patient, a NIfTI volume), else to the row. Without the column, DICOM and NIfTI rows
  are grouped by their own keys (as by their readers) and images are not grouped.
* ``data.split_column``: the official split, ``train`` / ``val`` / ``test`` (also ``training``, ``valid``,
  ``validation``, ``testing``; any case). A manifest without ``val`` rows has one carved out of ``train``.

Rows are checked before anything is decoded. A missing file, a path listed twice, an empty or unknown label
and an unknown split are each one line, ``<manifest>: row <n>: ...`` (``n`` the line in the file, the
header being line 1); under ``data.skip_bad`` the row is skipped and counted instead. A file that does not
decode names the file and the row (``<file>: <reason> (row <n> of <manifest name>)``). A Parquet table's rows
are numbered as the same table saved as CSV would be (first data row: 2).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.base import DatasetSpec, Decoded, Source, progress, stack_if_same
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.privacy import salted_key
from medpretrain.data.readers import file_readers, reader_for_file

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".tab", ".parquet", ".pq")
SPLIT_VALUES: dict[str, str] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                                "validation": "val", "test": "test", "testing": "test"}
_DEFAULTS = DataConfig()
_BINARY = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}


@dataclass
class _Row:
    """One usable row: its index among the data rows, its line, the path as written, the file, its label,
    the salted patient key of its patient cell, and its split."""

    index: int
    line: int
    written: str
    file: Path
    label: int | np.ndarray | None
    group: str | None
    split: str | None


def is_manifest(path: Path) -> bool:
    """True for a file whose suffix names a manifest table (``.csv``, ``.tsv``, ...)."""
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def _texts(values: list[object]) -> list[str]:
    """A Parquet column as the texts a CSV of the same table holds: null / NaN empty, booleans ``true`` /
    ``false``; a float column whose values are all integral (an integer column with nulls, as pandas
    writes it) as integers (``1.0`` -> ``1``), so integer class indices stay integers."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and v != v)]
    integral = bool(present) and all(isinstance(v, float) and v.is_integer() for v in present)
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):
            out.append("")
        elif isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8", errors="replace"))
        else:
            out.append(str(int(v)) if integral and isinstance(v, float) else str(v))
    return out


def _read_parquet(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(manifest, "reading a Parquet manifest needs pyarrow (pip install 'medpretrain[parquet]'), "
                                  "or save the table as .csv / .tsv") from None
    try:
        table = pq.read_table(manifest)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(manifest, f"cannot read Parquet manifest ({str(e).splitlines()[0]})") from None
    header = [str(n).strip() for n in table.column_names]
    columns = [_texts(col.to_pylist()) for col in table.columns]
    rows = [(i + 2, dict(zip(header, cells, strict=True))) for i, cells in enumerate(zip(*columns, strict=True))]
    return header, rows


def read_table(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (stripped names) and ``(line number, row)`` pairs of a CSV / TSV / Parquet file (a Parquet
    row's number is its line in the same table saved as CSV). Raises DataError."""
    suffix = manifest.suffix.lower()
    if not manifest.is_file():
        raise DataError(manifest, "manifest not found (relative paths resolve against data.root or "
                                  "$MEDPRETRAIN_DATA)" if not manifest.exists()
                        else "not a .csv / .tsv / .parquet manifest")
    if suffix in (".parquet", ".pq"):
        return _read_parquet(manifest)
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, {k: v for k, v in r.items() if isinstance(k, str)}) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(manifest, f"cannot read {'TSV' if delimiter == chr(9) else 'CSV'} manifest ({e})") from None
    return header, rows


def _column(manifest: Path, header: list[str], key: str, name: str | None, required: bool) -> str | None:
    """``name`` when the header has it; ``None`` when it is optional and absent; else DataError."""
    if not name:
        return None
    if name in header:
        return name
    if not required and name == getattr(_DEFAULTS, key):
        return None
    raise DataError(manifest, f"manifest needs an '{name}' column (data.{key}; has: {', '.join(header) or 'none'})")


def _cell(row: dict[str, str], column: str | None) -> str:
    return (row.get(column) or "").strip() if column else ""


def _class_index(values: list[str], cfg: DataConfig, column: str) -> tuple[list[int | str], list[str]]:
    """Per row, the class index of a single label or the reason it has none (see the module docstring);
    and the class names."""
    names: list[str]
    if cfg.classes:
        names = list(cfg.classes)
        index = {c: i for i, c in enumerate(names)}
        unknown = f"(data.classes: {', '.join(names)})"
        return [index.get(v, f"unknown label {v!r} in column '{column}' {unknown}") if v else "empty label"
                for v in values], names
    given = [v for v in values if v]
    if given and all(v.lstrip("-").isdigit() for v in given):
        k = len({int(v) for v in given if int(v) >= 0})
        return [("empty label" if not v else int(v) if 0 <= int(v) < k else f"label {int(v)} out of range 0..{k - 1}")
                for v in values], [str(i) for i in range(k)]
    names = sorted(set(given))
    position = {c: i for i, c in enumerate(names)}
    return [position[v] if v else "empty label" for v in values], names


def _multi_hot(row: dict[str, str], columns: list[str]) -> np.ndarray | str:
    """The row's float32 ``[K]`` vector, or the reason it has none."""
    vec = np.zeros(len(columns), np.float32)
    for k, c in enumerate(columns):
        v = _cell(row, c)
        if not v:
            return f"empty label in column '{c}'"
        if v.lower() not in _BINARY:
            return f"unknown label {v!r} in column '{c}' (expected 0 or 1)"
        vec[k] = _BINARY[v.lower()]
    return vec


@dataclass
class _Table:
    """The checked rows of a manifest and what its columns say."""

    rows: list[_Row]
    class_names: list[str]
    labelled: bool
    multilabel: bool
    patients: bool


def _rows(manifest: Path, header: list[str], table: list[tuple[int, dict[str, str]]], cfg: DataConfig,
          skips: SkipLog) -> _Table:
    """The rows that pass every check (in file order; a bad row raises, or is counted under skip_bad)."""
    path_col = _column(manifest, header, "path_column", cfg.path_column, required=True)
    multi = list(cfg.label_columns or [])
    if multi and cfg.classes:
        raise ConfigError("config key 'data.classes': applies to data.label_column, not to data.label_columns")
    if len(set(multi)) != len(multi):
        raise ConfigError(f"config key 'data.label_columns': names a column twice: {multi}")
    for c in multi:
        _column(manifest, header, "label_columns", c, required=True)
    label_col = None if multi else _column(manifest, header, "label_column", cfg.label_column, required=False)
    patient_col = _column(manifest, header, "patient_column", cfg.patient_column, required=False)
    split_col = _column(manifest, header, "split_column", cfg.split_column, required=True)
    if not table:
        raise DataError(manifest, "manifest has no rows")
    single: list[int | str] = []
    class_names = list(multi)
    if label_col:
        single, class_names = _class_index([_cell(r, label_col) for _, r in table], cfg, label_col)
    base = manifest.parent
    seen: dict[Path, int] = {}
    rows: list[_Row] = []
    for i, (line, r) in enumerate(table):
        reason, row = _check_row(r, i, line, base, seen, path_col, multi, single[i] if label_col else None,
                                 patient_col, split_col)
        if row is None:
            skips.handle(DataError(manifest, f"row {line}: {reason}"))
        else:
            rows.append(row)
    return _Table(rows, class_names, bool(multi or label_col), bool(multi), patient_col is not None)


def _check_row(r: dict[str, str], i: int, line: int, base: Path, seen: dict[Path, int], path_col: str | None,
               multi: list[str], single: int | str | None, patient_col: str | None,
               split_col: str | None) -> tuple[str, _Row | None]:
    """``("", row)`` for a good row, else ``(reason, None)``: its cells are checked first (path, labels, split),
    then its file (listed before, missing). ``seen`` records the files of the rows checked so far."""
    written = _cell(r, path_col)
    if not written:
        return f"empty {path_col}", None
    label: int | np.ndarray | None = None
    if multi:
        vec = _multi_hot(r, multi)
        if isinstance(vec, str):
            return vec, None
        label = vec
    elif isinstance(single, str):
        return single, None
    else:
        label = single
    split = None
    if split_col:
        value = _cell(r, split_col)
        split = SPLIT_VALUES.get(value.lower())
        if split is None:
            return (f"unknown split {value!r} in column '{split_col}' (expected train, val or test)" if value
                    else f"empty split in column '{split_col}'"), None
    p = Path(written).expanduser()
    file = Path(os.path.normpath(p if p.is_absolute() else base / p))
    if file in seen:
        return f"duplicated path {written!r} (also row {seen[file]}; one row per file)", None
    seen[file] = line
    if not file.is_file():
        return f"{written}: cannot read file ({'a folder' if file.is_dir() else 'no such file'})", None
    patient = _cell(r, patient_col)
    return "", _Row(i, line, written, file, label, salted_key(patient) if patient else None, split)


def _decode(rows: list[_Row], cfg: DataConfig, manifest: Path, skips: SkipLog) -> list[tuple[_Row, Decoded]]:
    """Decode every row's file with the reader the registry picks for it."""
    out = []
    for row in progress(rows, "manifest"):
        try:
            reader = reader_for_file(row.file)
            if reader is None:
                known = sorted({s for r in file_readers() for s in r.suffixes})
                raise DataError(row.file, f"unknown file format (no known signature; suffixes read: "
                                          f"{', '.join(known)})")
            out.append((row, reader.decode(row.file, cfg, row.written)))
        except DataError as err:
            skips.handle(DataError(err.path, f"{err.reason} (row {row.line} of {manifest.name})"))
    return out


def read_manifest_source(manifest: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read a CSV / TSV manifest (see the module docstring) into a :class:`Source`.

    Raises DataError for an unreadable table, a missing column, a bad row (unless ``skip_bad``) or nothing
    readable; ConfigError for inconsistent column options.
    """
    manifest = Path(manifest)
    header, table = read_table(manifest)
    first_skip = len(skips.skipped)
    checked = _rows(manifest, header, table, cfg, skips)
    if not checked.rows:
        raise DataError(manifest, "no usable rows")
    decoded = _decode(checked.rows, cfg, manifest, skips)
    if not decoded:
        raise DataError(manifest, f"none of the {len(checked.rows)} file(s) could be read")
    grouped = checked.patients or any(d.group is not None or len(d) > 1 for _, d in decoded)
    images: list[np.ndarray] = []
    names: list[str] = []
    groups: list[str] = []
    labels: list[int | np.ndarray] = []
    paths: list[str] = []
    splits: dict[str, list[int]] = {}
    for row, d in decoded:
        # No patient cell: the file's own key, else the row's ("row<i>", the key manifests always used).
        group = row.group or d.group or salted_key(f"row{row.index}")
        if row.split is not None:
            splits.setdefault(row.split, []).extend(range(len(names), len(names) + len(d)))
        images.extend(d.images)
        names.extend(d.names)
        groups.extend([group] * len(d))
        paths.extend([row.written] * len(d))
        if row.label is not None:
            labels.extend([row.label] * len(d))
    if splits and "train" not in splits:
        raise DataError(manifest, f"no readable row of the 'train' split (data.split_column; has: "
                                  f"{', '.join(sorted(splits))})")
    label_array = None
    task = "unlabeled"
    if checked.labelled:
        if checked.multilabel:
            label_array, task = np.stack(labels).astype(np.float32), "multilabel"
        else:
            label_array = np.asarray(labels, dtype=np.int64)
            task = "binary" if len(checked.class_names) == 2 else "multiclass"
    thumbs = [d.thumbs for _, d in decoded]
    skipped = list(skips.skipped[first_skip:])
    log.info("%s: %d sample(s) from %d file(s); %d skipped", manifest, len(names), len(decoded), len(skipped))
    return Source(
        images=stack_if_same(images),
        task=task,  # type: ignore[arg-type]
        names=names,
        files=[row.file for row, _ in decoded] + [manifest],
        labels=label_array,
        class_names=checked.class_names if checked.labelled else [],
        groups=np.asarray(groups) if grouped else None,
        official_splits={s: np.asarray(v, dtype=np.int64) for s, v in splits.items()} or None,
        skipped=skipped,
        thumbs=np.concatenate(thumbs) if all(t is not None for t in thumbs) else None,  # type: ignore[arg-type]
        paths=paths,
    )


def manifest_files(spec: DatasetSpec, cfg: DataConfig) -> list[Path]:
    """The manifest and every file its rows name that exists (for the data stamp; nothing is decoded)."""
    return table_files(spec.paths[0], cfg)


def table_files(manifest: Path, cfg: DataConfig) -> list[Path]:
    """``manifest`` and the existing files of its ``data.path_column`` (see :func:`manifest_files`)."""
    header, table = read_table(manifest)
    column = _column(manifest, header, "path_column", cfg.path_column, required=True)
    files = [manifest]
    for _, r in table:
        written = _cell(r, column)
        if written:
            p = Path(written).expanduser()
            f = p if p.is_absolute() else manifest.parent / p
            if f.is_file():
                files.append(f)
    return files
