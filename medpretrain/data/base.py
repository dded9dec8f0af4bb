"""The in-memory form every reader produces, and the torch Dataset built from it.

Readers (``medmnist``, ``folder``, ``dicom``, ``nifti``, ``segpairs``) turn a source into a
:class:`Source`: images already decoded, converted to the configured channel count, resized, and
scaled to [0, 1] (float32 ``[C, H, W]``; the scaling is documented per reader). Splitting, label
fractions and normalisation then happen in one place (:func:`medpretrain.data.build_dataset`).
Decoding everything up front means a bad file fails (or is skipped) before training starts, never
deep inside a DataLoader worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Task = Literal["binary", "multiclass", "multilabel", "segmentation", "unlabeled"]


@dataclass
class Source:
    """Decoded samples of one dataset, before splitting.

    images: N arrays ``[C, H, W]`` float32 in [0, 1] (one stacked array when sizes agree).
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

    images: list[np.ndarray] | np.ndarray
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
