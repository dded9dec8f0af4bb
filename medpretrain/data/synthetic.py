"""Synthetic images added to a label budget's training images (``data.synthetic``, fine-tuning only).

A ``samples.npz`` of class-conditional samples (``generative/sample.py per_class=<n>``: ``images`` uint8 in
MedMNIST layout ``[N, H, W]`` / ``[N, H, W, 1]`` / ``[N, H, W, 3]``, ``labels`` int64 ``[N]`` class indices,
optional ``class_names`` and ``seed``) is read, checked against the data source and turned into images the way
the MedMNIST reader turns its files into images (/ 255, ITU-R 601 luma for RGB -> grey or repetition for grey
-> RGB, bilinear antialiased resize to the real images' size). Then, per class ``c``:

* ``data.synthetic_ratio = r``: ``round_half_up(r * n_c)`` synthetic images of class ``c`` are added, ``n_c``
  being the number of real training images of class ``c`` in the label budget's subset;
* ``data.synthetic_per_class = k`` instead: ``k`` of every class.

They are drawn without replacement from the file's images of that class: the first ``m`` of a permutation drawn
from ``numpy.random.SeedSequence([seed, c])`` (``seed``: the run's seed), so the same seed gives the same
images, another seed others, and a larger count contains the smaller one's images.

What is guaranteed (:func:`augment_train`): the synthetic images join the **training** split only, after the
label subset is drawn; the real subset, validation and test are those of the run without them. The input
normalisation is the fixed ``data.mean`` / ``data.std`` (nothing is estimated from data); the frozen regimes'
BatchNorm re-estimation reads the real training images only (:func:`real_images`), while everything that is
*fitted* on the training split (the trained layers and heads, the linear probe with its feature
standardisation, the kNN bank) sees real and synthetic images alike.

Refusals (:class:`~medpretrain.data.errors.DataError` naming the file, one line): an unreadable file, no
``images`` or no ``labels``, labels that are not class indices of the source, class names or a class count that
disagree with the source, an image layout or aspect ratio that cannot be made the real images', and a class
with fewer images than the run needs. Multi-label, segmentation and multi-task runs refuse the option
(:class:`~medpretrain.config.ConfigError`).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.errors import DataError
from medpretrain.data.transforms import LUMA_601, resize
from medpretrain.utils import sha256_file

__all__ = ["SampleFile", "SyntheticAugmented", "augment_train", "draw", "load_samples", "real_images", "wanted"]


@dataclass(frozen=True)
class SampleFile:
    """A checked ``samples.npz``: ``images`` uint8 ``[N, C, H, W]`` (C 1 or 3), ``labels`` int64 ``[N]``."""

    path: Path
    sha256: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] | None
    seed: int | None

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


_FILES: dict[tuple[str, int, int], SampleFile] = {}


def load_samples(path: str | Path, class_names: Sequence[str]) -> SampleFile:
    """Read and check ``path`` against a source with ``class_names`` (cached per process by path, size, mtime).

    Raises :class:`DataError` naming the file: unreadable, no ``images`` / ``labels``, a layout other than
    ``[N, H, W]`` / ``[N, H, W, 1 or 3]`` uint8, labels that are not ``N`` class indices of the source, or
    ``class_names`` that differ from the source's (names or count)."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        raise DataError(p, "synthetic sample file not found (data.synthetic)") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        if len(_FILES) > 4:
            _FILES.clear()
        _FILES[key] = _read(p)
    found = _FILES[key]
    _check_classes(found, list(class_names))
    return found


def _read(p: Path) -> SampleFile:
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(p, f"not a readable .npz file ({e})") from None
    for k in ("images", "labels"):
        if k not in arrays:
            raise DataError(p, f"has no '{k}' (has: {', '.join(sorted(arrays)) or 'nothing'}); data.synthetic needs "
                               "class-conditional samples (generative/sample.py per_class=<n>)")
    x, y = arrays["images"], arrays["labels"]
    if x.dtype != np.uint8:
        raise DataError(p, f"images have dtype {x.dtype}; expected uint8")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = np.moveaxis(x, -1, 1)
    else:
        raise DataError(p, f"images have shape {list(x.shape)}; expected [N, H, W] or [N, H, W, 1 or 3]")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(p, f"labels have shape {list(y.shape)} and dtype {y.dtype}; expected {len(x)} integer "
                           "class indices")
    if y.size and y.min() < 0:
        raise DataError(p, f"labels must be class indices >= 0, found {int(y.min())}")
    names = [str(n) for n in arrays["class_names"].reshape(-1)] if "class_names" in arrays else None
    seed = int(arrays["seed"]) if "seed" in arrays and arrays["seed"].size == 1 else None
    return SampleFile(p, sha256_file(p), x, y.astype(np.int64), names, seed)


def _check_classes(f: SampleFile, source_names: list[str]) -> None:
    k = len(source_names)
    if f.class_names is not None and f.class_names != source_names:
        raise DataError(f.path, f"class names {f.class_names} differ from the data source's {source_names}")
    if f.labels.size and int(f.labels.max()) >= k:
        raise DataError(f.path, f"has label {int(f.labels.max())} but the data source has {k} classes "
                                f"{source_names}")


def wanted(real_counts: Sequence[int], ratio: float, per_class: int | None) -> list[int]:
    """Synthetic images per class: ``per_class`` for every class, else ``round_half_up(ratio * n_c)``."""
    if per_class is not None:
        return [int(per_class)] * len(real_counts)
    return [int(math.floor(ratio * n + 0.5)) for n in real_counts]


def draw(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices into the file: for class ``c``, the first ``counts[c]`` of a permutation of the file's class-``c``
    images drawn from ``SeedSequence([seed, c])``; sorted. The caller has checked that there are enough."""
    chosen = []
    for c, m in enumerate(counts):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng(np.random.SeedSequence([seed, c]))
        chosen.append(rng.permutation(members)[:m])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _to_real_layout(f: SampleFile, pixels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``[M, C', H', W']`` -> float32 ``[M, C, H, W]`` in [0, 1] like the MedMNIST reader: / 255, channels
    (luma / repetition), then a bilinear antialiased resize. Refuses a different aspect ratio (it would distort)."""
    c, h, w = shape
    fh, fw = f.images.shape[-2:]
    if fh * w != fw * h:
        raise DataError(f.path, f"images are {fh}x{fw}, the real training images {h}x{w}: the aspect ratios differ, "
                                "so resizing would distort them")
    x = pixels.astype(np.float32) / 255.0
    if x.shape[1] != c:
        x = np.einsum("c,nchw->nhw", LUMA_601, x)[:, None] if c == 1 else np.repeat(x, 3, axis=1)
    return resize(x, (h, w)) if len(x) else np.zeros((0, c, h, w), dtype=np.float32)


class SyntheticAugmented(Dataset):
    """The real training split of a label budget (:attr:`real`, a
    :class:`~medpretrain.data.dataset.MedicalDataset`) followed by synthetic images: items ``0 .. len(real) - 1``
    are the real ones, unchanged; then the synthetic ones, normalised by the same ``mean`` / ``std`` (and through
    the real split's ``transform`` if it has one). ``labels`` are real then synthetic; ``synthetic`` is the
    ``results.json`` record; other attributes (``task``, ``class_names``, ``fingerprint``, ``split_info``, ...)
    are the real split's."""

    def __init__(self, real: Any, images: np.ndarray, labels: np.ndarray, record: dict[str, Any]):
        self.real = real
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.synthetic_labels = np.asarray(labels, dtype=np.int64)
        self.labels = np.concatenate([np.asarray(real.labels, dtype=np.int64), self.synthetic_labels])
        self.names = [*real.names, *(f"synthetic[{i}]" for i in record["file_indices"])]
        self.synthetic = record

    def __getattr__(self, name: str) -> Any:  # task, class_names, fingerprint, split_info, mean, std, ...
        if name == "real":
            raise AttributeError(name)
        return getattr(self.real, name)

    def __len__(self) -> int:
        return len(self.real) + len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.real)
        if i < n:
            return self.real[i]
        k = i - n
        sample: dict[str, Any] = {"image": torch.from_numpy(self.images[k].copy()),
                                  "label": torch.as_tensor(int(self.synthetic_labels[k]), dtype=torch.int64),
                                  "index": i}
        if self.real.transform is not None:
            sample = self.real.transform(sample)
        if self.real.normalize:
            sample["image"] = (sample["image"] - self.real.mean) / self.real.std
        return sample

    def __repr__(self) -> str:
        return f"SyntheticAugmented({self.real!r} + {len(self.images)} synthetic)"


def real_images(dataset: Any) -> Any:
    """The real images of a training set: :attr:`SyntheticAugmented.real`, else ``dataset`` itself (what the
    frozen regimes re-estimate BatchNorm statistics on)."""
    return dataset.real if isinstance(dataset, SyntheticAugmented) else dataset


def check_options(cfg: DataConfig, task: str, multitask: bool = False) -> None:
    """Raise :class:`ConfigError` when ``data.synthetic*`` is set for a task that cannot take it."""
    if not cfg.synthetic:
        return
    if task == "segmentation":
        raise ConfigError("data.synthetic: synthetic images are added to classification training only "
                          "(task=segmentation has no class labels to draw them by)")
    if multitask:
        raise ConfigError("data.synthetic: multi-task runs (tasks) do not take synthetic images")


def augment_train(real: Any, cfg: DataConfig, seed: int) -> Any:
    """``real`` (the label budget's training split) with the synthetic images of ``cfg.synthetic`` added (see the
    module docstring), as a :class:`SyntheticAugmented`; ``real`` itself when ``data.synthetic`` is empty.

    Raises :class:`ConfigError` for a multi-label source, :class:`DataError` naming the file for a file that
    cannot be used or has too few images of a class."""
    if not cfg.synthetic:
        return real
    if real.task not in ("binary", "multiclass"):
        raise ConfigError(f"data.synthetic needs single-label classes, {cfg.dataset!r} is {real.task}")
    k = len(real.class_names)
    f = load_samples(cfg.synthetic, real.class_names)
    real_counts = np.bincount(real.labels, minlength=k).tolist()
    want = wanted(real_counts, cfg.synthetic_ratio, cfg.synthetic_per_class)
    have = f.per_class(k)
    how = (f"data.synthetic_per_class={cfg.synthetic_per_class}" if cfg.synthetic_per_class is not None
           else f"data.synthetic_ratio={cfg.synthetic_ratio:g}")
    for c in range(k):
        if have[c] < want[c]:
            raise DataError(f.path, f"has {have[c]} images of class {c} ({real.class_names[c]!r}), the run needs "
                                    f"{want[c]} ({how}, {real_counts[c]} real); draw more per class")
    chosen = draw(f.labels, want, seed)
    shape = tuple(np.asarray(real.source.images[int(real.indices[0])]).shape)
    images = _to_real_layout(f, f.images[chosen], shape)  # type: ignore[arg-type]
    record = {"file": str(f.path), "sha256": f.sha256, "file_seed": f.seed, "draw_seed": seed,
              "ratio": cfg.synthetic_ratio if cfg.synthetic_per_class is None else None,
              "per_class_option": cfg.synthetic_per_class, "class_names": list(real.class_names),
              "real_per_class": real_counts, "added_per_class": want, "added": int(sum(want)),
              "available_per_class": have, "file_image_shape": list(f.images.shape[1:]),
              "converted": list(f.images.shape[1:]) != list(shape), "file_indices": chosen.tolist()}
    return SyntheticAugmented(real, images, f.labels[chosen], record)
