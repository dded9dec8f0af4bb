"""The forms readers produce: a parsed :class:`DatasetSpec`, one file's :class:`Decoded` samples, and the
:class:`Source` of a whole dataset.

Readers (registered in :mod:`medpretrain.data.readers`) turn a source into a :class:`Source`: images
already decoded, converted to the configured channel count, resized, and scaled to [0, 1] (float32
``[C, H, W]``; the scaling is documented per reader). Readers of single files also decode one file into a
:class:`Decoded` (what a manifest row, or a per-file cache, needs). Splitting, label fractions and
normalisation then happen in one place (:func:`medpretrain.data.build_dataset`). Decoding everything up
front means a bad file fails (or is skipped) before training starts, never deep inside a DataLoader worker.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

Task = Literal["binary", "multiclass", "multilabel", "segmentation", "unlabeled"]
PROGRESS_MIN_FILES = 200


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec string (:func:`medpretrain.data.spec.parse_spec`). ``paths`` are absolute;
    ``name`` / ``size`` are set for ``medmnist`` only; ``root`` is the data root it was resolved against."""

    scheme: str
    text: str
    paths: tuple[Path, ...] = ()
    name: str | None = None
    size: int | None = None
    root: Path | None = None


@dataclass
class Decoded:
    """The samples one file decodes to (a frame of a DICOM file, a slice of a NIfTI volume, an image).

    images: ``[S, C, H, W]`` float32 in [0, 1], resized to the configured size (S >= 1).
    names: per sample (``"<file>"``, or ``"<file>#<k>"`` for frames / slices); never patient identifiers.
    group: a salted key the file itself gives (DICOM patient / study / file, NIfTI subject / volume), which
    keeps its samples in one split; ``None`` for a plain image (its caller decides).
    thumbs: ``[S, 32, 32]`` grey thumbnails of the native image for near-duplicate grouping, or ``None``.
    """

    images: np.ndarray
    names: list[str]
    group: str | None = None
    thumbs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


DecodeHook = Callable[[Callable[..., "Decoded"], Path, Any, str, dict[str, Any]], "Decoded"]
_DECODE_HOOK: ContextVar[DecodeHook | None] = ContextVar("medpretrain_decode_hook", default=None)


def decode_file(fn: Callable[..., Decoded], path: Path, cfg: Any, rel: str = "", **kwargs: Any) -> Decoded:
    """``fn(path, cfg, rel, **kwargs)``: a reader's per-file decoder, called through here so that the on-disk
    cache (:mod:`medpretrain.data.cache`) can list the files a source decodes and serve them from disk
    (:func:`decoding_with`). Without a hook it is the plain call."""
    hook = _DECODE_HOOK.get()
    return fn(path, cfg, rel, **kwargs) if hook is None else hook(fn, path, cfg, rel, kwargs)


@contextmanager
def decoding_with(hook: DecodeHook) -> Iterator[None]:
    """Route every :func:`decode_file` call in this context (thread / task) through ``hook``."""
    token = _DECODE_HOOK.set(hook)
    try:
        yield
    finally:
        _DECODE_HOOK.reset(token)


def progress(items: list, desc: str) -> Iterable:
    """tqdm over ``items``, shown only on a terminal and for at least ``PROGRESS_MIN_FILES`` items."""
    quiet = len(items) < PROGRESS_MIN_FILES or not sys.stderr.isatty()
    return tqdm(items, desc=desc, disable=quiet, leave=False)


def stack_if_same(images: list[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    """One ``[N, C, H, W]`` array when all shapes agree, else the list unchanged."""
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


class LazyImages:
    """A read-only sequence of float32 ``[C, H, W]`` images produced on access (the on-disk cache's
    :class:`~medpretrain.data.cache.CachedImages`, the streamed :class:`~medpretrain.data.stream.StreamedImages`):
    ``images[j]``, slices and index arrays (stacked), iteration and ``np.asarray`` like an in-memory array.
    Subclasses set ``item_shape`` and ``what`` and define ``__len__`` and :meth:`item`."""

    dtype = np.dtype(np.float32)
    item_shape: tuple[int, ...]
    what = "images"
    """How an out-of-range index error names them (``cached images``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, j: int) -> np.ndarray:
        """Image ``j`` (``0 <= j < len(self)``)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    def __getitem__(self, j: Any) -> np.ndarray:
        if isinstance(j, (int, np.integer)):
            if not -len(self) <= j < len(self):
                raise IndexError(f"index {j} out of range for {len(self)} {self.what}")
            return self.item(int(j) % len(self))
        picked = np.arange(len(self))[j]
        return np.stack([self.item(int(i)) for i in np.atleast_1d(picked)]).reshape(-1, *self.item_shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        for j in range(len(self)):
            yield self.item(j)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]  # every image in memory: for small sets (audits), not for training
        return out if dtype is None else out.astype(dtype)


@dataclass
class Source:
    """Decoded samples of one dataset, before splitting.

    images: N arrays ``[C, H, W]`` float32 in [0, 1] (one stacked array when sizes agree), a
    :class:`medpretrain.data.cache.CachedImages` reading them from the on-disk cache (``data.cache``), or a
    :class:`medpretrain.data.stream.StreamedImages` decoding each from its file on access (``data.stream``).
    labels: ``[N]`` int64 class indices, or ``[N, K]`` {0, 1} for multi-label; ``None`` if unlabeled.
    masks / rois: N arrays ``[1, H, W]`` in {0, 1} for segmentation; ``None`` otherwise.
    groups: ``[N]`` strings (salted patient keys) used to keep a patient in one split; ``None`` if unknown.
    names: display name per sample (file name, ``npz[index]``, ``file#frame``); never patient identifiers.
    official_splits: split name -> sample indices, when the source defines them (MedMNIST, DRIVE).
    files: every file read, for the dataset fingerprint.
    skipped: ``(file, reason)`` for files skipped under ``skip_bad``.
    thumbs: ``[N, 32, 32]`` float32 grey thumbnails of the native images, for near-duplicate grouping
    (:mod:`medpretrain.data.duplicates`); ``None`` where a reader keeps none.
    paths: per sample, its path relative to the dataset folder (posix) or as written in a manifest, which
    ``data.group_regex`` is matched against; ``None``: ``names``.
    """

    images: list[np.ndarray] | np.ndarray | LazyImages
    task: Task
    names: list[str]
    files: list[Path]
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    masks: list[np.ndarray] | None = None
    rois: list[np.ndarray] | None = None
    groups: np.ndarray | None = None
    official_splits: dict[str, np.ndarray] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    thumbs: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)
