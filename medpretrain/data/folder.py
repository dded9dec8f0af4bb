"""``folder:<path>``: a folder of image files, or a CSV manifest.

Layouts:

* ``<path>/<class>/**/*.png`` - one class per sub-folder (sorted names; sub-folders without images are
  ignored). A single class folder means unlabeled.
* ``<path>/*.png`` with no class sub-folders - unlabeled (for pretraining).
* ``<path>`` is a ``.csv`` / ``.tsv`` manifest: read by :mod:`medpretrain.data.manifest` (rows may point
  at images, DICOM and NIfTI files alike; label, multi-label, patient and split columns).

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

import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medpretrain.config import DataConfig
from medpretrain.data.base import Decoded, Source, decode_file, progress, stack_if_same  # noqa: F401 (re-exported)
from medpretrain.data.duplicates import thumbnail
from medpretrain.data.errors import DataError, SkipLog, check_pixel_limit
from medpretrain.data.manifest import MANIFEST_SUFFIXES, read_manifest_source
from medpretrain.data.transforms import resize, to_channels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
DEFAULT_CLASSIFICATION_SIZE = 224


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; hidden files skipped)."""
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if is_image_file(p))


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


def decode_image_file(path: Path, cfg: DataConfig, rel: str = "") -> Decoded:
    """One image file as one sample: resized to ``cfg.image_size`` (224 when ``None``) with
    ``cfg.channels`` channels, and the 32x32 thumbnail of its native image. ``rel`` (the path as the source
    knows it) is unused: a plain image carries no group key. Raises DataError naming the file."""
    native = load_image(path, cfg.channels, cfg.max_pixels)
    size = cfg.image_size or DEFAULT_CLASSIFICATION_SIZE
    return Decoded(images=resize(native, size)[None], names=[path.name], thumbs=thumbnail(native)[None])


def _decode_all(files: list[Path], cfg: DataConfig, skips: SkipLog, desc: str) -> list[Decoded | None]:
    """Per file: its :class:`Decoded` sample, or None when skipped under ``skip_bad``."""
    out: list[Decoded | None] = []
    for f in progress(files, desc):
        try:
            out.append(decode_file(decode_image_file, f, cfg))
        except DataError as err:
            skips.handle(err)
            out.append(None)
    return out


def _labelled_source(files: list[Path], labels: list[int] | None, class_names: list[str],
                     cfg: DataConfig, skips: SkipLog, desc: str, paths: list[str]) -> Source:
    decoded = _decode_all(files, cfg, skips, desc)
    keep = [i for i, im in enumerate(decoded) if im is not None]
    if not keep:
        raise DataError(desc, f"none of the {len(files)} image(s) could be read")
    images = stack_if_same([decoded[i].images[0] for i in keep])  # type: ignore[union-attr]
    lab = np.asarray([labels[i] for i in keep], dtype=np.int64) if labels is not None else None
    task = "unlabeled" if lab is None else ("binary" if len(class_names) == 2 else "multiclass")
    return Source(
        images=images,
        task=task,  # type: ignore[arg-type]
        names=[files[i].name for i in keep],
        files=list(files),
        labels=lab,
        class_names=class_names if lab is not None else [],
        skipped=list(skips.skipped),
        thumbs=np.concatenate([decoded[i].thumbs for i in keep]),  # type: ignore[union-attr, misc]
        paths=[paths[i] for i in keep],
    )


def read_folder_source(path: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read ``folder:<path>`` (a folder or a CSV / TSV manifest); see the module docstring."""
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest_source(path, cfg, skips)
    if not path.exists():
        raise DataError(path, "not found (a folder or a .csv / .tsv manifest; relative paths resolve against "
                              "data.root or $MEDPRETRAIN_DATA)")
    if not path.is_dir():
        raise DataError(path, "not a folder or a .csv / .tsv manifest")
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
        return _labelled_source(files, labels, class_names, cfg, skips, str(path), rel)
    files = list_images(path)
    if not files and per_class:
        (only,) = per_class.values()
        log.info("%s: a single class folder; reading it as unlabeled", path)
        files = only
    if not files:
        raise DataError(path, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    rel = [f.relative_to(path).as_posix() for f in files]
    return _labelled_source(files, None, [], cfg, skips, str(path), rel)
