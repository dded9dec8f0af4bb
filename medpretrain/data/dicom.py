"""``dicom:<path>``: DICOM files (one file, or a folder searched recursively) as 2D samples.

Files are recognised by the ``DICM`` marker at byte 128, or, without it, by a forced pydicom read that
yields an image data set (Pixel Data, Rows or SOP Class UID present). In a folder, files that are
clearly something else are ignored without being opened: hidden files, ``DICOMDIR`` and the suffixes in
:data:`NOT_DICOM_SUFFIXES` (``.txt``, ``.json``, ``.csv``, images, archives...). Every other file
must be DICOM, or it is reported as a :class:`DataError` (skipped and counted under ``skip_bad``).

Labels follow the ``folder:`` reader: with two or more sub-folders holding DICOM files, each
sub-folder is a class (sorted names; files directly in ``<path>`` are then ignored, with a warning);
otherwise the whole tree is read as unlabeled (task ``"unlabeled"``).

Pixels, per frame (every frame of a multi-frame file is a sample named ``"<file>#<frame>"``; single
frame files are named ``"<file>"``; names are the file name only, never a folder):

1. decode (native, RLE, JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000 through the installed
   pydicom plugins; YBR colour is converted to RGB by pydicom);
2. monochrome: modality LUT (Modality LUT Sequence, or Rescale Slope / Intercept, taken from the
   per-frame or shared functional groups of enhanced multi-frame files when present), then VOI by
   ``window``:

   * ``"auto"``: the VOI LUT Sequence if present (its output range scaled to [0, 1]), else the
     first Window Center / Width (with the file's VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID,
     PS3.3 C.11.2.1.2), else min-max;
   * ``"minmax"``: the minimum and maximum of the whole file (all frames) map to 0 and 1 (a constant
     image gives 0);
   * ``"<centre>,<width>"``: ``[centre - width/2, centre + width/2]`` of the modality values (e.g.
     Hounsfield units) maps linearly to [0, 1], values outside are clipped;

   MONOCHROME1 is then inverted (``1 - x``) so that high values are bright, as in MONOCHROME2;
3. colour (RGB, YBR, PALETTE COLOR via its lookup table): scaled by the full range of the stored
   bits (``2**BitsStored - 1``, or of the palette entries); ``window`` does not apply to colour,
   except ``"minmax"`` (whole file). With ``channels == 1`` colour becomes grey by ITU-R 601 luma;
   with ``channels == 3`` grey is repeated;
4. resized to ``image_size`` (224 when ``None``), bilinear with antialiasing, aspect not kept.
A frame of more than ``data.max_pixels`` pixels (Rows x Columns from the header, checked before any
decoding; 0 = no limit) is a DataError naming the file.

Result: float32 ``[C, H, W]`` in [0, 1], finite.

Not handled (by design, for now): Presentation LUT Shape ``INVERSE`` and supplemental / enhanced
palettes on monochrome images are not applied; with several windows in the header the first is used;
files without file meta information (no ``DICM`` preamble *and* no Transfer Syntax UID, such as
pydicom-data's ``OT-PAL-8-face.dcm``) are rejected rather than decoded under a guessed syntax;
non-image DICOM objects (reports, plans, DICOMDIR under another name) are reported as "no pixel data",
so mixed PACS exports need ``skip_bad: true``; text burned into the pixels is not removed.

Privacy: patient identifiers (names, IDs, dates, institution, accession number...) are never logged,
returned or put into names or error messages. pydicom's own warnings, which may quote element values,
are not passed on (only counted at debug level), and text of pydicom exceptions is scrubbed of every
person name, date, time and identifier value of the file before it is used in a reason.
``Source.groups`` holds a *salted* patient key: ``sha256("<salt>:<PatientID>")`` truncated to 16 hex
digits, with the salt from ``$MEDPRETRAIN_SALT`` or the project default :data:`DEFAULT_SALT`
(the same default as the ``folder:`` manifest's ``patient`` column). With the public default salt,
a short or guessable PatientID can be recovered by trying candidates, so set ``MEDPRETRAIN_SALT``
to a private value for real patient data. Files without a PatientID are grouped by their Study
Instance UID, else by the file itself (``"study-..."`` / ``"file-..."`` keys, equally hashed), so
frames of one file never end up in two splits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, iter_pixels
from pydicom.uid import UID

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.base import Decoded, Source, Task, decode_file
from medpretrain.data.errors import DataError, SkipLog, check_pixel_limit
from medpretrain.data.folder import progress
from medpretrain.data.privacy import DEFAULT_SALT, SALT_ENV, project_salt, salted_key  # noqa: F401
from medpretrain.data.transforms import resize, to_channels

logger = logging.getLogger(__name__)

"""Project default salt for patient keys (public: set ``$MEDPRETRAIN_SALT`` for real data)."""
DEFAULT_IMAGE_SIZE = 224

NOT_DICOM_SUFFIXES: frozenset[str] = frozenset({
    ".txt", ".json", ".csv", ".tsv", ".md", ".rst", ".xml", ".html", ".htm", ".pdf", ".yaml", ".yml",
    ".ini", ".cfg", ".log", ".py", ".sh", ".bat", ".exe",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp",
    ".nii", ".gz", ".zip", ".tar", ".tgz", ".bz2", ".xz", ".7z", ".npz", ".npy", ".pkl", ".pt", ".pth",
    ".safetensors", ".mhd", ".nrrd",
})
"""Suffixes of files that a DICOM folder scan ignores without opening them."""
NOT_DICOM_NAMES: frozenset[str] = frozenset({"dicomdir", "thumbs.db", "desktop.ini", "license", "readme"})

# Decoding plugins that make each compressed transfer syntax readable with pydicom 3.
_PLUGIN_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg, or pillow, or python-gdcm",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg, or pillow, or python-gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg + pylibjpeg-libjpeg, or pyjpegls, or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg + pylibjpeg-libjpeg, or pyjpegls, or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg, or pillow, or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg, or pillow, or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "numpy (built in) or pylibjpeg + pylibjpeg-rle",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Value representations whose values may identify a patient (names, dates, free text, identifiers).
_PHI_VRS = frozenset({"PN", "DA", "DT", "TM", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "AS", "UI"})
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")

Window = Literal["auto", "minmax"] | tuple[float, float]


# --------------------------------------------------------------------------------------------
# Configuration and patient keys
# --------------------------------------------------------------------------------------------


def parse_window(text: str) -> Window:
    """Parse ``DataConfig.window``: ``"auto"``, ``"minmax"`` or ``"<centre>,<width>"`` (width > 0).

    Raises :class:`ConfigError` (a ``ValueError``) naming ``data.window`` otherwise.
    """
    t = str(text).strip().lower()
    if t in ("auto", "minmax"):
        return t  # type: ignore[return-value]
    parts = t.split(",")
    try:
        centre, width = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"config key 'data.window': {text!r} is not 'auto', 'minmax' or '<centre>,<width>' (e.g. '40,400')"
        ) from None
    if not (np.isfinite(centre) and np.isfinite(width)) or width <= 0:
        raise ConfigError(f"config key 'data.window': width must be a positive number, got {text!r}")
    return (centre, width)


def dicom_patient_key(ds: Dataset, salt: str | None = None) -> str | None:
    """Salted hash of (0010,0020) Patient ID (whitespace stripped), or ``None`` when absent or empty.

    Two files of the same patient get the same key; the raw ID is never returned. ``salt=None``
    uses :func:`project_salt`.
    """
    pid = ds.get("PatientID")
    text = str(pid).strip() if pid is not None else ""
    return salted_key(text, salt) if text else None


def _group_key(ds: Dataset, file_id: str, salt: str | None) -> str:
    """Patient key, else ``study-<hash>`` of the Study Instance UID, else ``file-<hash>`` of ``file_id``."""
    key = dicom_patient_key(ds, salt)
    if key is not None:
        return key
    study = str(ds.get("StudyInstanceUID") or "").strip()
    if study:
        return "study-" + salted_key(study, salt)
    return "file-" + salted_key(file_id, salt)


# --------------------------------------------------------------------------------------------
# Safe error text
# --------------------------------------------------------------------------------------------


def _identifying_values(ds: Dataset | None) -> list[str]:
    """String values of the data set that could identify a patient (longest first)."""
    if ds is None:
        return []
    values: set[str] = set()
    try:
        for elem in ds.iterall():
            if elem.VR not in _PHI_VRS or elem.value is None:
                continue
            items = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
            for v in items:
                s = str(v).strip()
                if len(s) >= 2:
                    values.add(s)
                    values.update(p for p in re.split(r"[\^=]", s) if len(p) >= 2)
    except Exception:  # a damaged data set: scrub what was collected so far
        pass
    return sorted(values, key=len, reverse=True)


def _safe_text(exc: BaseException, ds: Dataset | None, limit: int = 160) -> str:
    """``"<ExceptionType>: <first line>"`` of ``exc``, shortened, with identifying values redacted."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for value in _identifying_values(ds):
        text = text.replace(value, "<redacted>")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Drop(logging.Filter):
    """Counts and drops records (pydicom warnings can quote element values such as names or dates)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        self.texts.append(record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[list[str]]:
    """Silence pydicom's warnings and log records for the block; yields their texts (filled at exit).

    The texts are for classifying a failure (e.g. "End of file"), never for output.

    Not thread-safe (it swaps global warning filters), like ``warnings.catch_warnings`` itself.
    """
    names = ["pydicom"] + [n for n in logging.root.manager.loggerDict if n.startswith("pydicom.")]
    texts: list[str] = []
    drop = _Drop(texts)
    for n in names:
        logging.getLogger(n).addFilter(drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield texts
            texts.extend(str(w.message) for w in caught)
    finally:
        for n in names:
            logging.getLogger(n).removeFilter(drop)
    if texts:
        logger.debug("pydicom reported %d message(s); not shown as they may quote element values", len(texts))


# --------------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------------


def has_dicm_marker(path: Path) -> bool:
    """True when bytes 128..131 of ``path`` are ``b"DICM"`` (a DICOM Part 10 file)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_ignored_name(path: Path) -> bool:
    """True for files a folder scan skips unopened: hidden, DICOMDIR, or a suffix in NOT_DICOM_SUFFIXES."""
    name = path.name.lower()
    return name.startswith(".") or name in NOT_DICOM_NAMES or path.suffix.lower() in NOT_DICOM_SUFFIXES


def _looks_like_image_dataset(ds: Dataset) -> bool:
    return any(k in ds for k in (*_PIXEL_KEYWORDS, "Rows", "SOPClassUID"))


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return UID(str(uid)).name if uid else "unknown SOP class"


def read_dataset(path: Path, max_pixels: int = DataConfig.max_pixels) -> Dataset:
    """Read ``path`` as a DICOM data set holding decodable pixel data, or raise :class:`DataError`.

    Reasons: empty file; not a DICOM file; corrupt or truncated; no pixel data (with the SOP class);
    no file meta / transfer syntax (files without the ``DICM`` preamble); unsupported transfer syntax
    (no pydicom decoder); transfer syntax whose decoding plugin is not installed (names the plugins);
    frames of more than ``max_pixels`` pixels (0 = no limit).
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or type(e).__name__})") from None
    if path.is_dir():
        raise DataError(path, "is a folder, not a DICOM file")
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    part10 = has_dicm_marker(path)
    with _quiet_pydicom() as messages:
        try:
            ds = pydicom.dcmread(path, force=not part10)
        # pydicom raises many types on damaged input (EOFError, struct.error, ValueError, KeyError...).
        # Only the type is reported: messages of a failed parse can quote raw element values.
        except Exception as e:
            if part10:
                raise DataError(path, f"corrupt or truncated DICOM file (cannot parse the data set: "
                                      f"{type(e).__name__})") from None
            raise DataError(path, "not a DICOM file (no 'DICM' marker at byte 128 and no readable "
                                  "DICOM data set)") from None
    truncated = any("End of file" in m or "EOF" in m for m in messages)
    if not part10 and not _looks_like_image_dataset(ds):
        raise DataError(path, "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM image "
                              "elements when read without it)")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if truncated:
            raise DataError(path, "truncated DICOM file: end of file reached inside an element, "
                                  "no pixel data could be read")
        raise DataError(path, f"no pixel data in this file (SOP class '{_sop_class(ds)}'), nothing to decode")
    if truncated:
        raise DataError(path, "truncated DICOM file: end of file reached inside an element")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise DataError(path, "no DICOM file meta information (no 'DICM' preamble and no Transfer Syntax "
                              "UID), so the pixel data encoding is unknown; re-save it as a DICOM Part 10 "
                              "file (e.g. dcmconv or gdcmconv)")
    _check_decoder(path, UID(str(ts)))
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise DataError(path, f"image has no size (Rows={rows}, Columns={cols})")
    check_pixel_limit(path, rows * cols, max_pixels)
    _check_native_length(path, ds, UID(str(ts)))
    return ds


def _check_native_length(path: Path, ds: Dataset, ts: UID) -> None:
    """For uncompressed Pixel Data, raise DataError when fewer bytes are present than the header implies."""
    if ts.is_encapsulated or "PixelData" not in ds:
        return
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
        n_values = int(ds.Rows) * int(ds.Columns) * samples * max(frames, 1)
    except (AttributeError, TypeError, ValueError):
        return  # incomplete image header: pydicom's decoder reports it
    expected = (n_values + 7) // 8 if bits == 1 else n_values * bits // 8
    present = len(ds.PixelData)
    if present < expected:
        raise DataError(path, f"truncated pixel data: {present} of {expected} bytes present "
                              f"(the file is cut short or its image header is wrong)")


def _check_decoder(path: Path, ts: UID) -> None:
    """Raise DataError when pydicom has no usable decoder for transfer syntax ``ts``."""
    label = f"'{ts.name}' ({ts})" if ts.name != str(ts) else f"'{ts}'"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DataError(path, f"unsupported transfer syntax {label}: pydicom {pydicom.__version__} has no "
                              f"decoder for it; convert the file to an uncompressed or JPEG syntax "
                              f"(e.g. with gdcmconv --raw)") from None
    if not decoder.is_available:
        hint = _PLUGIN_HINTS.get(str(ts)) or "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DataError(path, f"compressed transfer syntax {label} cannot be decoded: no decoding plugin "
                              f"installed; install {hint}")


# --------------------------------------------------------------------------------------------
# Pixel transforms
# --------------------------------------------------------------------------------------------


@dataclass
class _FrameLut:
    """Modality rescale and VOI window of one frame (functional groups override the top level)."""

    slope: float | None = None
    intercept: float | None = None
    centre: float | None = None
    width: float | None = None
    function: str = "LINEAR"


def _first(value: Any) -> float | None:
    """First value of a (possibly multi-valued) numeric element, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _functional_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """First item of ``keyword`` in the per-frame, else shared, functional group of ``frame``."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for seq, idx in ((per_frame, frame), (shared, 0)):
        if seq and idx < len(seq) and keyword in seq[idx] and seq[idx][keyword].value:
            return seq[idx][keyword].value[0]  # type: ignore[no-any-return]
    return None


def _frame_lut(ds: Dataset, frame: int) -> _FrameLut:
    pvt = _functional_item(ds, frame, "PixelValueTransformationSequence") or ds
    voi = _functional_item(ds, frame, "FrameVOILUTSequence") or ds
    lut = _FrameLut(
        slope=_first(pvt.get("RescaleSlope")),
        intercept=_first(pvt.get("RescaleIntercept")),
        centre=_first(voi.get("WindowCenter")),
        width=_first(voi.get("WindowWidth")),
        function=str(voi.get("VOILUTFunction") or "LINEAR").strip().upper(),
    )
    return lut


def apply_window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR_EXACT") -> np.ndarray:
    """Map values through a DICOM VOI window to [0, 1] (PS3.3 C.11.2.1.2).

    ``LINEAR``: ``(x - (c - 0.5)) / (w - 1) + 0.5`` clipped (a step at ``c - 0.5`` when ``w <= 1``);
    ``LINEAR_EXACT``: ``(x - c) / w + 0.5`` clipped, i.e. ``[c - w/2, c + w/2] -> [0, 1]``;
    ``SIGMOID``: ``1 / (1 + exp(-4 (x - c) / w))``. Returns float32.
    """
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - centre) / width, -500, 500)))
    elif function == "LINEAR_EXACT":
        out = np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    elif width <= 1:
        out = (x > centre - 0.5).astype(np.float64)
    else:
        out = np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return out.astype(np.float32)


def _modality(frame: np.ndarray, ds: Dataset, lut: _FrameLut) -> np.ndarray:
    """Stored values -> modality values (float64): Modality LUT Sequence, else rescale, else as is."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(frame, ds).astype(np.float64)
    x = frame.astype(np.float64)
    if lut.slope is not None or lut.intercept is not None:
        x = x * (1.0 if lut.slope is None else lut.slope) + (lut.intercept or 0.0)
    return x


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first VOI LUT Sequence item and scale its output range (of the table) to [0, 1]."""
    item = ds.VOILUTSequence[0]
    n_entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    table = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds).astype(np.float64)
    lo, hi = float(table.min()), float(table.max())
    out = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((out - lo) / (hi - lo)).astype(np.float32)


@dataclass
class _Stats:
    """Running min / max of the values that the file-level min-max scaling needs."""

    lo: float = np.inf
    hi: float = -np.inf

    def update(self, x: np.ndarray) -> tuple[float, float]:
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        return lo, hi


def _local_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` scaled by its own range to [0, 1] (zeros when constant), float32."""
    return ((x - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(x.shape, np.float32)


def _palette_rgb(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """PALETTE COLOR frame -> RGB float64 ``[H, W, 3]`` in [0, 1].

    Linear palettes are looked up here because pydicom 3.0's ``apply_color_lut`` reads 16-bit OW
    table data in the machine's byte order, which is wrong for Explicit VR Big Endian files (their
    colours come out byte-swapped). Segmented palettes go through pydicom, which handles byte order.
    Full scale: 65535 for 16-bit entries (255 when a table declared 8-bit only holds 8-bit values).
    """
    if "RedPaletteColorLookupTableData" not in ds:
        rgb = apply_color_lut(frame, ds)[..., :3]
        return rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max)
    n_entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    n_entries = n_entries or 65536
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    luts = []
    for colour in ("Red", "Green", "Blue"):
        value = ds[f"{colour}PaletteColorLookupTableData"].value
        if isinstance(value, (bytes, bytearray)):
            width = 2 if len(value) >= 2 * n_entries else 1
            order = "<" if ts.is_little_endian else ">"
            lut = np.frombuffer(value[: width * n_entries], dtype=f"{order}u{width}").astype(np.int64)
        else:
            lut = np.asarray(value, dtype=np.int64).reshape(-1)
            width = 2 if lut.max(initial=0) > 255 or bits > 8 else 1
        luts.append(lut)
    table = np.stack(luts, axis=-1)
    full = 255.0 if width == 1 or (bits == 8 and table.max() <= 255) else 65535.0
    index = np.clip(frame.astype(np.int64) - first, 0, len(table) - 1)
    return table[index].astype(np.float64) / full


def load_dicom(path: str | os.PathLike[str], window: str | Window = "auto", channels: int = 1,
               size: int | None = None, max_pixels: int = DataConfig.max_pixels) -> list[np.ndarray]:
    """Decode every frame of a DICOM file to float32 ``[channels, H, W]`` in [0, 1].

    ``window``: ``"auto"``, ``"minmax"``, ``"<centre>,<width>"`` or a ``(centre, width)`` tuple (see the
    module docstring). ``size``: resize every frame to ``size x size`` (bilinear, antialiased) while
    decoding, which bounds memory for long multi-frame files; ``None`` keeps the stored size.
    Raises :class:`DataError` naming the file for anything unreadable, or frames of more than
    ``max_pixels`` pixels (0 = no limit).
    """
    p = Path(path)
    return _decode(p, read_dataset(p, max_pixels), _as_window(window), _check_channels(channels), size)


def _as_window(window: str | Window) -> Window:
    return window if isinstance(window, tuple) else parse_window(window)


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels': must be 1 or 3, got {channels!r}")
    return channels


def _decode(path: Path, ds: Dataset, window: Window, channels: int, size: int | None) -> list[np.ndarray]:
    """Frames of ``ds`` (already checked by :func:`read_dataset`) -> list of ``[C, H, W]`` in [0, 1]."""
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    colour = photometric in _COLOUR or photometric == "PALETTE COLOR"
    if not colour and not photometric.startswith("MONOCHROME"):
        raise DataError(path, f"unsupported photometric interpretation '{photometric}'")
    stats = _Stats()
    frames: list[tuple[np.ndarray, tuple[float, float] | None]] = []  # (image, local range if min-max)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    index = 0
    with _quiet_pydicom():
        try:
            for index, raw in enumerate(iter_pixels(ds)):
                img, local = _frame_to_unit(path, raw, ds, index, photometric, colour, window, channels, stats)
                frames.append((resize(img, size) if size else img, local))
        except DataError:
            raise
        except Exception as e:  # decoder failures: truncated fragments, bad codestreams, wrong lengths
            raise DataError(path, f"cannot decode pixel data of frame {index} ({ts.name}; the file may be "
                                  f"truncated or corrupt): {_safe_text(e, ds)}") from None
    if not frames:
        raise DataError(path, "no frames in the pixel data")
    out = []
    for img, local in frames:
        if local is not None:  # file-level min-max; affine, so it commutes with the bilinear resize
            lo, hi = local
            img = _local_unit(img * (hi - lo) + lo, stats.lo, stats.hi) if stats.hi > stats.lo else img * 0
        if photometric == "MONOCHROME1":
            img = 1.0 - img
        img = np.clip(img, 0.0, 1.0).astype(np.float32)
        if not np.isfinite(img).all():
            raise DataError(path, "pixel values are not finite (NaN or infinity)")
        out.append(img)
    return out


def _frame_to_unit(path: Path, raw: np.ndarray, ds: Dataset, index: int, photometric: str, colour: bool, window: Window,
                   channels: int, stats: _Stats) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One decoded frame -> ``[channels, H, W]`` float32 and, for min-max frames, its own value range.

    Min-max frames are returned scaled by their own range; :func:`_decode` rescales them to the range
    of the whole file once every frame has been seen.
    """
    if colour:
        if photometric == "PALETTE COLOR":
            rgb = _palette_rgb(raw, ds)
        else:
            rgb = raw.astype(np.float64) / float(2 ** int(ds.get("BitsStored") or raw.dtype.itemsize * 8) - 1)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise DataError(path, f"unexpected colour frame shape {rgb.shape}")
        img = np.moveaxis(rgb, -1, 0)
        img = to_channels(img.astype(np.float32), channels)
        if window == "minmax":
            lo, hi = stats.update(img)
            return _local_unit(img, lo, hi), (lo, hi)
        return np.clip(img, 0.0, 1.0), None
    if raw.ndim != 2:
        raise DataError(path, f"unexpected monochrome frame shape {raw.shape}")
    lut = _frame_lut(ds, index)
    values = _modality(raw, ds, lut)
    unit: np.ndarray | None = None
    if isinstance(window, tuple):
        unit = apply_window(values, window[0], window[1], "LINEAR_EXACT")
    elif window == "auto" and ds.get("VOILUTSequence"):
        unit = _voi_lut_sequence(values, ds)
    elif window == "auto" and lut.centre is not None and lut.width is not None and lut.width > 0:
        unit = apply_window(values, lut.centre, lut.width, lut.function)
    if unit is not None:
        return to_channels(unit[None], channels), None
    lo, hi = stats.update(values)
    return to_channels(_local_unit(values, lo, hi)[None], channels), (lo, hi)


# --------------------------------------------------------------------------------------------
# A folder (or a file) as a Source
# --------------------------------------------------------------------------------------------


def _candidates(folder: Path, accept: Callable[[Path], bool]) -> tuple[list[Path], int]:
    """Files under ``folder`` (recursive, sorted, hidden folders skipped) that ``accept``, and the count refused."""
    files, refused = [], 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]):
            continue
        if accept(p):
            files.append(p)
        else:
            refused += 1
    return files, refused


def list_class_layout(path: Path, accept: Callable[[Path], bool]) -> tuple[list[Path], list[int] | None, list[str], int]:
    """Files of ``path`` that ``accept``, their class indices (``None`` if unlabeled), class names, refused count.

    ``path`` may be one file (returned as is). Two or more sub-folders holding accepted files make a
    labelled layout, one class per sub-folder (sorted; files directly in ``path`` are then left out with a
    warning); otherwise every accepted file under ``path`` (recursively) is unlabeled. Shared by the
    DICOM and NIfTI readers; it mirrors the ``folder:`` reader's rule.
    """
    if path.is_file():
        return [path], None, [], 0
    if not path.is_dir():
        raise DataError(path, "not found (relative paths resolve against data.root / $MEDPRETRAIN_DATA)")
    per_class: dict[str, list[Path]] = {}
    refused = 0
    for d in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files, n = _candidates(d, accept)
        refused += n
        if files:
            per_class[d.name] = files
    if len(per_class) >= 2:
        top = [p for p in path.iterdir() if p.is_file() and accept(p)]
        if top:
            logger.warning("%s: %d file(s) directly in the folder are not in a class sub-folder; ignored",
                           path, len(top))
        names = sorted(per_class)
        files = [f for c in names for f in per_class[c]]
        labels = [i for i, c in enumerate(names) for _ in per_class[c]]
        return files, labels, names, refused
    files, refused = _candidates(path, accept)
    return files, None, [], refused


def read_class_files(path: Path, files: list[Path], labels: list[int] | None, class_names: list[str], log: SkipLog,
                     kind: str, candidates: str, containers: str, decode: Callable[[Path, str], Decoded]) -> Source:
    """The :class:`Source` of the ``files`` of a class layout (:func:`list_class_layout`; ``labels`` per file, or
    ``None``), each decoded by ``decode(file, rel)`` (``rel``: its posix path under ``path``) into one or more
    samples that carry the file's label and group. A bad file's :class:`DataError` goes to ``log`` (raised, or
    counted under ``skip_bad``). Raises DataError when no file could be read; warns about class folders left
    without a readable sample. ``kind`` / ``candidates`` / ``containers`` name the files in the progress bar, the
    error and the log line (``"NIfTI"``, ``"NIfTI file(s)"``, ``"volume(s)"``)."""
    first_skip = len(log.skipped)
    chunks: list[np.ndarray] = []
    names: list[str] = []
    groups: list[str] = []
    sample_labels: list[int] = []
    read: list[Path] = []
    for i, f in enumerate(progress(files, kind)):
        rel = (f.relative_to(path) if f != path else Path(f.name)).as_posix()
        try:
            decoded = decode(f, rel)
        except DataError as err:
            log.handle(err)
            continue
        read.append(f)
        chunks.append(np.asarray(decoded.images))
        names += decoded.names
        groups += [decoded.group] * len(decoded)  # type: ignore[list-item]
        if labels is not None:
            sample_labels += [labels[i]] * len(decoded)
    skipped = list(log.skipped[first_skip:])
    if not chunks:
        raise DataError(path, f"none of the {len(files)} {candidates} could be read")
    if labels is not None:
        empty = [c for k, c in enumerate(class_names) if k not in set(sample_labels)]
        if empty:
            logger.warning("%s: class folder(s) %s have no readable %s images", path, ", ".join(empty), kind)
    logger.info("%s: %d sample(s) from %d %s; %d skipped", path, len(names), len(read), containers, len(skipped))
    return Source(
        images=np.concatenate(chunks),
        task=task_for(class_names, labels is not None),
        names=names,
        files=read,
        labels=np.asarray(sample_labels, dtype=np.int64) if labels is not None else None,
        class_names=class_names if labels is not None else [],
        groups=np.asarray(groups),
        skipped=skipped,
    )


def task_for(class_names: list[str], labelled: bool) -> Task:
    """``"unlabeled"``, ``"binary"`` (two classes) or ``"multiclass"``."""
    if not labelled:
        return "unlabeled"
    return "binary" if len(class_names) == 2 else "multiclass"


def decode_dicom_file(path: Path, cfg: DataConfig, rel: str) -> Decoded:
    """Every frame of one DICOM file (see the module docstring) at ``cfg.image_size`` (224 when ``None``), named
    ``"<file>"`` or ``"<file>#<k>"``, with its salted group key: the patient's, else the study's, else one
    from ``rel`` (the file's path as its source knows it). Raises DataError naming the file, ConfigError for a
    bad ``window`` / ``channels``."""
    ds = read_dataset(path, cfg.max_pixels)
    frames = _decode(path, ds, parse_window(cfg.window), _check_channels(cfg.channels),
                     cfg.image_size or DEFAULT_IMAGE_SIZE)
    names = [f"{path.name}#{k}" for k in range(len(frames))] if len(frames) > 1 else [path.name]
    return Decoded(images=np.stack(frames), names=names, group=_group_key(ds, rel, project_salt()))


def read_dicom_source(path: Path, cfg: DataConfig, log: SkipLog) -> Source:
    """Read ``dicom:<path>`` (a file or a folder; see the module docstring) into a :class:`Source`.

    Every frame is a sample of size ``cfg.image_size`` (224 when ``None``) with ``cfg.channels``
    channels, scaled per ``cfg.window``. Bad files raise :class:`DataError`, or are counted in
    ``log`` (and ``Source.skipped``) under ``skip_bad``. ``groups`` are salted patient keys.
    Raises DataError when nothing readable is found; ConfigError for a bad ``window`` / ``channels``.
    """
    path = Path(path)
    parse_window(cfg.window)  # bad options fail before any file is listed
    _check_channels(cfg.channels)
    files, labels, class_names, ignored = list_class_layout(path, lambda p: not is_ignored_name(p))
    if ignored:
        logger.info("%s: ignored %d file(s) that are clearly not DICOM (by name)", path, ignored)
    if not files:
        raise DataError(path, "no DICOM files found")
    return read_class_files(path, files, labels, class_names, log, "DICOM", "candidate DICOM file(s)", "DICOM file(s)",
                            lambda f, rel: decode_file(decode_dicom_file, f, cfg, rel))
