"""``nifti:<path>``: NIfTI volumes (``.nii`` / ``.nii.gz``; one file, or a folder searched recursively) cut
into 2D slices.

* Layout and labels as for ``dicom:`` (:func:`medpretrain.data.dicom.list_class_layout`): two or more
  sub-folders holding volumes are classes, else unlabeled. Other files in the folder are ignored.
* Orientation: each volume is first reoriented to the closest canonical RAS+ axes (nibabel's
  ``io_orientation``), so ``slice_axis`` 0 / 1 / 2 cuts sagittal / coronal / axial slices whatever the
  stored voxel order. Each slice is then shown as a radiology viewer (and a DICOM file) would: patient
  right on the image's left, anterior (axial) or superior (coronal, sagittal) at the top, i.e. the
  in-plane array ``s[a, b]`` becomes ``s[::-1, ::-1].T``. Slice indices in names (``"<file>#<k>"``)
  count along the reoriented axis.
* 4D volumes (time series, multi-echo...): only the first volume (index 0 of the 4th axis) is used;
  2D images are one slice; further dimensions must have size 1.
* Intensities: the voxels of the (first) volume are clipped to its 0.5th and 99.5th percentiles
  (computed over finite voxels, scaling slope / intercept applied) and mapped linearly to [0, 1]
  (robust to a few hot voxels; one scale per volume, so slices of a volume stay comparable). If the two
  percentiles coincide, the volume's min and max are used; a constant volume has no content. NaN or
  infinite voxels become 0.
* Empty slices, constant after scaling (padding, air outside the field of view), are skipped unless
  ``skip_empty=False``; a volume with no non-empty slice is a :class:`DataError`.
* Size and channels: resized to ``image_size`` (224 when ``None``), bilinear with antialiasing, aspect
  not kept; grey repeated when ``channels == 3``.
* Limit: a (first) volume of more than ``data.max_pixels`` voxels, read from the header before the data,
  is a :class:`DataError` naming the file (0 = no limit).
* ``groups``: slices of one volume always share a group, so a volume is never split across train /
  val / test. The key is the BIDS subject (a ``sub-<label>`` folder or file-name prefix) when present,
  so all volumes of a subject stay together, else the volume file; keys are salted hashes
  (:func:`medpretrain.data.dicom.salted_key`), never paths.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.base import Decoded, Source, decode_file
from medpretrain.data.dicom import (
    DEFAULT_IMAGE_SIZE,
    list_class_layout,
    project_salt,
    read_class_files,
    salted_key,
)
from medpretrain.data.errors import DataError, SkipLog, check_pixel_limit
from medpretrain.data.transforms import resize, to_channels

logger = logging.getLogger(__name__)

PERCENTILES = (0.5, 99.5)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_BIDS_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)")


def is_nifti_file(path: Path) -> bool:
    """True for non-hidden ``*.nii`` / ``*.nii.gz`` files."""
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(NIFTI_SUFFIXES)


def load_nifti_volume(path: str | Path, max_pixels: int = DataConfig.max_pixels) -> np.ndarray:
    """The first 3D volume of a NIfTI file in closest-canonical RAS+ voxel order, float32 ``[X, Y, Z]``.

    Scaling slope / intercept are applied; 2D images come back as ``[X, Y, 1]``. Raises
    :class:`DataError` for an empty, unreadable, corrupt or truncated file, more than 4 non-trivial
    dimensions, or a first volume of more than ``max_pixels`` voxels (0 = no limit).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(p, f"cannot read file ({e.strerror or type(e).__name__})") from None
    if size == 0:
        raise DataError(p, "empty file (0 bytes)")
    try:
        img: Any = nib.load(p)
    except nib.filebasedimages.ImageFileError:
        raise DataError(p, _unidentified_reason(p)) from None
    # A damaged header or gzip stream fails in many ways (OSError, EOFError, zlib.error, ValueError...).
    except Exception as e:
        raise DataError(p, f"corrupt NIfTI header ({type(e).__name__}: {_short(e)})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 4 and any(s != 1 for s in shape[4:]):
        raise DataError(p, f"unsupported {len(shape)}D image of shape {shape} (2D, 3D or 4D expected)")
    if len(shape) < 2 or min(shape) < 1:
        raise DataError(p, f"unsupported image shape {shape}")
    check_pixel_limit(p, int(np.prod(shape[:3], dtype=np.int64)), max_pixels, what="volume", unit="voxels")
    index: tuple[int | slice, ...] = (slice(None),) * min(len(shape), 3) + (0,) * max(0, len(shape) - 3)
    if len(shape) >= 4 and shape[3] > 1:
        logger.info("%s: 4D image with %d volumes; using the first", p.name, shape[3])
    try:
        data = np.asarray(img.dataobj[index], dtype=np.float32)
    except Exception as e:
        raise DataError(p, f"corrupt or truncated NIfTI data ({type(e).__name__}: {_short(e)})") from None
    if data.ndim == 2:
        data = data[:, :, None]
    affine = img.affine if img.affine is not None else np.eye(4)
    try:
        ornt = io_orientation(affine[:4, :4])
    except Exception:  # a degenerate affine (zeros): keep the stored voxel order
        logger.warning("%s: degenerate affine; slices are cut in stored voxel order", p.name)
        return data
    return np.ascontiguousarray(apply_orientation(data, ornt))


def _unidentified_reason(path: Path) -> str:
    """Why nibabel could not identify ``path``: a damaged gzip stream, or not NIfTI at all."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as gz:
                while gz.read(1 << 20):
                    pass
        except (OSError, EOFError, zlib.error) as e:
            return f"corrupt or truncated gzip stream ({type(e).__name__})"
    return "not a NIfTI file (nibabel cannot identify the format)"


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scale_volume(volume: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Clip ``volume`` to its ``percentiles`` (over finite voxels) and map that range to [0, 1] (float32).

    Falls back to min-max when the percentiles coincide; a constant volume maps to zeros; non-finite
    voxels become 0.
    """
    finite = np.isfinite(volume)
    values = volume[finite] if not finite.all() else volume
    if values.size == 0:
        return np.zeros(volume.shape, np.float32)
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(volume.shape, np.float32)
    out = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    out[~finite] = 0.0
    return out.astype(np.float32)


def volume_slices(volume01: np.ndarray, axis: int, skip_empty: bool = True) -> tuple[list[int], np.ndarray]:
    """Cut a scaled ``[X, Y, Z]`` volume along ``axis`` into display-oriented slices.

    Returns the kept slice indices and a ``[S, 1, H, W]`` float32 array (see the module docstring for
    the orientation). ``skip_empty`` drops slices that are constant.
    """
    moved = np.moveaxis(volume01, axis, 0)  # [S, a, b]
    display = np.swapaxes(moved[:, ::-1, ::-1], 1, 2)  # s[::-1, ::-1].T for every slice
    if skip_empty:
        flat = display.reshape(display.shape[0], -1)
        keep = np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
    else:
        keep = np.arange(display.shape[0])
    return keep.tolist(), np.ascontiguousarray(display[keep][:, None], dtype=np.float32)


def load_nifti(path: str | Path, slice_axis: int = 2, channels: int = 1, size: int | None = None,
               skip_empty: bool = True, max_pixels: int = DataConfig.max_pixels) -> tuple[list[int], np.ndarray]:
    """Slices of a NIfTI file: (kept slice indices, float32 ``[S, channels, H, W]`` in [0, 1]).

    ``size`` resizes (bilinear, antialiased); ``None`` keeps the volume's in-plane size. Raises
    :class:`DataError` for unreadable files, volumes without a non-empty slice and volumes of more than
    ``max_pixels`` voxels (0 = no limit).
    """
    p = Path(path)
    _check_axis(slice_axis)
    if channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels': must be 1 or 3, got {channels!r}")
    volume = load_nifti_volume(p, max_pixels)
    keep, slices = volume_slices(scale_volume(volume), slice_axis, skip_empty)
    if not keep:
        raise DataError(p, "volume is constant: no slice has any content")
    if size:
        slices = resize(slices, size)
    if channels == 3:
        slices = np.stack([to_channels(s, 3) for s in slices])
    return keep, slices


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ConfigError(f"config key 'data.slice_axis': must be 0, 1 or 2, got {axis!r}")


def _volume_group(rel: str, salt: str) -> str:
    """``subject-<hash>`` for a BIDS ``sub-<label>`` folder or file prefix of ``rel`` (the volume's path as its
    source knows it), else ``volume-<hash>`` of ``rel``."""
    for part in Path(rel).parts:
        m = _BIDS_SUBJECT.match(part)
        if m:
            return "subject-" + salted_key(m.group(1), salt)
    return "volume-" + salted_key(Path(rel).as_posix(), salt)


def decode_nifti_file(path: Path, cfg: DataConfig, rel: str, *, skip_empty: bool = True) -> Decoded:
    """The non-empty slices of one volume (see the module docstring) along ``cfg.slice_axis`` at
    ``cfg.image_size`` (224 when ``None``), named ``"<file>#<slice>"``, with the salted key of its BIDS subject,
    else of ``rel`` (its path as its source knows it). Raises DataError naming the file, ConfigError for bad
    options."""
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    keep, slices = load_nifti(path, cfg.slice_axis, cfg.channels, size, skip_empty, cfg.max_pixels)
    return Decoded(images=slices, names=[f"{path.name}#{k}" for k in keep], group=_volume_group(rel, project_salt()))


def read_nifti_source(path: Path, cfg: DataConfig, log: SkipLog, *, skip_empty: bool = True) -> Source:
    """Read ``nifti:<path>`` (a volume or a folder of volumes) into a :class:`Source` of 2D slices.

    Slices along ``cfg.slice_axis`` of size ``cfg.image_size`` (224 when ``None``) with ``cfg.channels``
    channels, named ``"<file>#<slice>"``, grouped per volume (see the module docstring). Bad files raise
    :class:`DataError` or are counted in ``log`` under ``skip_bad``.
    """
    path = Path(path)
    _check_axis(cfg.slice_axis)
    if cfg.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels': must be 1 or 3, got {cfg.channels!r}")
    files, labels, class_names, ignored = list_class_layout(path, is_nifti_file)
    if ignored:
        logger.info("%s: ignored %d file(s) that are not .nii / .nii.gz", path, ignored)
    if not files:
        raise DataError(path, "no NIfTI files (.nii, .nii.gz) found")
    return read_class_files(path, files, labels, class_names, log, "NIfTI", "NIfTI file(s)", "volume(s)",
                            lambda f, rel: decode_file(decode_nifti_file, f, cfg, rel, skip_empty=skip_empty))
