"""``folder:<path>``: a folder of image files, or a CSV manifest.

Layouts:

* ``<path>/<class>/**/*.png`` - one class per sub-folder (sorted names; sub-folders without images are
  ignored). A single class folder means unlabeled.
* ``<path>/*.png`` with no class sub-folders - unlabeled (for pretraining).
* ``<path>`` is a ``.csv`` manifest with columns ``image_path`` (relative to the CSV's folder) and
  ``label``; an optional ``patient`` column groups samples so one patient never spans two splits; other
  columns are ignored. Labels are class names (sorted), or, when every label is an integer, class
  indices that must lie in ``0..K-1`` for ``K`` distinct labels (else "label out of range").
  Without a ``label`` column the manifest is unlabeled.

Formats: PNG, JPEG, TIFF, BMP, GIF (first frame). Scaling to [0, 1] (float32 ``[C, H, W]``):
8-bit (and palette) images / 255; 16-bit PNG / TIFF / 65535 (the dtype range, not the image's
min-max); 32-bit integer images / 65535 when their values fit 16 bits (PIL reads some 16-bit files so),
else an error; 1-bit images as {0, 1}; float TIFF min-max per image (constant -> 0; NaN -> error).
Colour: RGB(A) images become grey by ITU-R 601 luma when ``channels == 1`` (exactly, when R = G = B);
grey is repeated when ``channels == 3``; alpha is dropped.
Size: resized to ``image_size`` (default 224), bilinear with antialiasing; aspect ratio is not kept.
Grouped splits: every sample keeps a 32x32 thumbnail of its native image (``Source.thumbs``, for
near-duplicate grouping, ``data.dedup``) and its path relative to the folder, or as written in the
manifest (``Source.paths``, for ``data.group_regex``); see :mod:`medpretrain.data.splits`.
Limit: an image of more than ``max_pixels`` pixels (``data.max_pixels``, read from the header before
decoding; 0 = no limit) is a DataError naming the file, in place of PIL's DecompressionBombError.
"""

from __future__ import annotations

import csv
import logging
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medpretrain.config import DataConfig
from medpretrain.data.base import Source
from medpretrain.data.duplicates import thumbnail
from medpretrain.data.errors import DataError, SkipLog, check_pixel_limit
from medpretrain.data.privacy import salted_key
from medpretrain.data.transforms import resize, to_channels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
DEFAULT_CLASSIFICATION_SIZE = 224
PROGRESS_MIN_FILES = 200


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; hidden files skipped)."""
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if is_image_file(p))


def progress(items: list, desc: str) -> Iterable:
    """tqdm over ``items``, shown only on a terminal and for at least ``PROGRESS_MIN_FILES`` items."""
    quiet = len(items) < PROGRESS_MIN_FILES or not sys.stderr.isatty()
    return tqdm(items, desc=desc, disable=quiet, leave=False)


_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb check switched off while a reader applies ``data.max_pixels`` itself.

    PIL raises ``DecompressionBombError`` (no file name, and only above twice its fixed limit) from
    ``Image.open``, before the size can be read; the readers check the header size against the
    configurable limit instead. ``MAX_IMAGE_PIXELS`` is a PIL module global, so it is restored after each
    file and the lock keeps readers in other threads from restoring it early.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pixels(path: Path, mask: bool = False, max_pixels: int = DataConfig.max_pixels) -> np.ndarray:
    """Decode the first frame of ``path`` to a numpy array (``[H, W]`` or ``[H, W, 3]``), closing the file.

    Colour modes (palette, CMYK, RGBA, ...) become RGB, grey+alpha becomes grey; for masks, palette
    images become grey (luma), so black is background. Raises DataError with the reason, also for an
    image of more than ``max_pixels`` pixels (0 = no limit), checked from the header before decoding.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _own_pixel_limit():
            warnings.simplefilter("ignore")  # e.g. TIFF tag warnings
            with Image.open(path) as im:
                check_pixel_limit(path, im.width * im.height, max_pixels)
                im.seek(0)
                im.load()
                if mask and im.mode in ("P", "PA"):
                    return np.asarray(im.convert("L"))
                if not mask and im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "RGBa"):
                    return np.asarray(im.convert("RGB"))
                if im.mode in ("LA", "La"):
                    return np.asarray(im.convert("L"))
                arr = np.asarray(im)
                return arr.astype(np.uint16) if im.mode.startswith("I;16") else arr
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown format or not an image)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(path, f"corrupt or truncated image ({e})") from None


def _scale(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scale a decoded array to float32 [0, 1] by its dtype range (see the module docstring)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.dtype(">u2"), np.dtype("<u2")):
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise DataError(path, f"integer pixel values {lo}..{hi} do not fit 8 or 16 bits")
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(path, "image contains NaN or infinite values")
        fmin, fmax = float(arr.min()), float(arr.max())
        if fmax == fmin:
            return np.zeros(arr.shape, np.float32)
        return ((arr.astype(np.float32) - fmin) / (fmax - fmin)).astype(np.float32)
    raise DataError(path, f"unsupported pixel type {arr.dtype}")


def load_image(path: Path, channels: int, max_pixels: int = DataConfig.max_pixels) -> np.ndarray:
    """Decode an image file to float32 ``[channels, H, W]`` in [0, 1]. Raises DataError naming the file,
    also for more than ``max_pixels`` pixels (``data.max_pixels``; 0 = no limit)."""
    arr = _pixels(path, max_pixels=max_pixels)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(path, f"unsupported image shape {arr.shape}")
    return to_channels(_scale(arr, path), channels)


def load_mask(path: Path, max_pixels: int = DataConfig.max_pixels) -> np.ndarray:
    """Decode a mask / roi file to float32 ``[1, H, W]`` in {0, 1} (any non-zero pixel is foreground)."""
    arr = _pixels(path, mask=True, max_pixels=max_pixels)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] in (3, 4) else arr.max(axis=-1)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(path, "mask contains NaN or infinite values")
    return (arr > 0).astype(np.float32)[None]


def salted_group(patient: str) -> str:
    """A stable, non-identifying key for a patient id (see :mod:`medpretrain.data.privacy`)."""
    return salted_key(patient)


def stack_if_same(images: list[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    """One ``[N, C, H, W]`` array when all shapes agree, else the list unchanged."""
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


def _decode_all(files: list[Path], cfg: DataConfig, skips: SkipLog,
                desc: str) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per file: (image resized to the configured size, 32x32 thumbnail of the native image), or None."""
    size = cfg.image_size or DEFAULT_CLASSIFICATION_SIZE
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for f in progress(files, desc):
        try:
            native = load_image(f, cfg.channels, cfg.max_pixels)
            out.append((resize(native, size), thumbnail(native)))
        except DataError as err:
            skips.handle(err)
            out.append(None)
    return out


def _labelled_source(files: list[Path], labels: list[int] | None, class_names: list[str],
                     groups: list[str] | None, cfg: DataConfig, skips: SkipLog, desc: str,
                     paths: list[str]) -> Source:
    decoded = _decode_all(files, cfg, skips, desc)
    keep = [i for i, im in enumerate(decoded) if im is not None]
    if not keep:
        raise DataError(desc, f"none of the {len(files)} image(s) could be read")
    images = stack_if_same([decoded[i][0] for i in keep])  # type: ignore[index]
    lab = np.asarray([labels[i] for i in keep], dtype=np.int64) if labels is not None else None
    task = "unlabeled" if lab is None else ("binary" if len(class_names) == 2 else "multiclass")
    return Source(
        images=images,
        task=task,  # type: ignore[arg-type]
        names=[files[i].name for i in keep],
        files=list(files),
        labels=lab,
        class_names=class_names if lab is not None else [],
        groups=np.asarray([groups[i] for i in keep]) if groups is not None else None,
        skipped=list(skips.skipped),
        thumbs=np.stack([decoded[i][1] for i in keep]),  # type: ignore[index]
        paths=[paths[i] for i in keep],
    )


def read_folder_source(path: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read ``folder:<path>`` (a folder or a CSV manifest); see the module docstring."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_manifest_source(path, cfg, skips)
    if not path.exists():
        raise DataError(path, "not found (a folder or a .csv manifest; relative paths resolve against "
                              "data.root or $MEDPRETRAIN_DATA)")
    if not path.is_dir():
        raise DataError(path, "not a folder or a .csv manifest")
    class_dirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    per_class = {d.name: list_images(d, recursive=True) for d in class_dirs}
    per_class = {k: v for k, v in per_class.items() if v}
    if len(per_class) >= 2:
        loose = list_images(path)
        if loose:
            log.warning("%s: %d image(s) beside the class folders are ignored (e.g. %s)", path, len(loose), loose[0].name)
        class_names = sorted(per_class)
        files = [f for c in class_names for f in per_class[c]]
        labels = [i for i, c in enumerate(class_names) for _ in per_class[c]]
        rel = [f.relative_to(path).as_posix() for f in files]
        return _labelled_source(files, labels, class_names, None, cfg, skips, str(path), rel)
    files = list_images(path)
    if not files and per_class:
        (only,) = per_class.values()
        log.info("%s: a single class folder; reading it as unlabeled", path)
        files = only
    if not files:
        raise DataError(path, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    rel = [f.relative_to(path).as_posix() for f in files]
    return _labelled_source(files, None, [], None, cfg, skips, str(path), rel)


def _parse_labels(raw: list[str], rows: list[int], manifest: Path,
                  skips: SkipLog) -> tuple[list[int | None], list[str]]:
    """Map raw label strings to class indices (None for rows skipped under skip_bad)."""
    stripped = [r.strip() for r in raw]
    if all(s.lstrip("-").isdigit() for s in stripped if s):
        ints = [int(s) if s else None for s in stripped]
        k = len({v for v in ints if v is not None and v >= 0})
        out: list[int | None] = []
        for v, row in zip(ints, rows, strict=True):
            if v is None or not 0 <= v < k:
                reason = "empty label" if v is None else f"label {v} out of range 0..{k - 1}"
                skips.handle(DataError(manifest, f"row {row}: {reason}"))
                out.append(None)
            else:
                out.append(v)
        return out, [str(i) for i in range(k)]
    class_names = sorted({s for s in stripped if s})
    index = {c: i for i, c in enumerate(class_names)}
    out = []
    for s, row in zip(stripped, rows, strict=True):
        if not s:
            skips.handle(DataError(manifest, f"row {row}: empty label"))
        out.append(index.get(s))
    return out, class_names


def read_manifest_source(manifest: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read a CSV manifest (``image_path``, optional ``label`` and ``patient``); see the module docstring."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(manifest, f"cannot read CSV manifest ({e})") from None
    if "image_path" not in header:
        raise DataError(manifest, f"manifest needs an 'image_path' column (has: {', '.join(header) or 'none'})")
    if not rows:
        raise DataError(manifest, "manifest has no rows")
    base = manifest.parent
    line_numbers = list(range(2, len(rows) + 2))
    labels: list[int | None] | None = None
    class_names: list[str] = []
    if "label" in header:
        labels, class_names = _parse_labels([r.get("label") or "" for r in rows], line_numbers, manifest, skips)
    files: list[Path] = []
    keep_labels: list[int] = []
    groups: list[str] = []
    written: list[str] = []
    for i, r in enumerate(rows):
        rel = (r.get("image_path") or "").strip()
        if not rel:
            skips.handle(DataError(manifest, f"row {line_numbers[i]}: empty image_path"))
            continue
        label = labels[i] if labels is not None else 0
        if label is None:
            continue
        p = Path(rel).expanduser()
        files.append(p if p.is_absolute() else base / p)
        written.append(rel)
        keep_labels.append(label)
        groups.append(salted_group((r.get("patient") or "").strip() or f"row{i}"))
    if not files:
        raise DataError(manifest, "no usable rows")
    source = _labelled_source(
        files, keep_labels if labels is not None else None, class_names,
        groups if "patient" in header else None, cfg, skips, str(manifest), written,
    )
    source.files.append(manifest)
    return source
