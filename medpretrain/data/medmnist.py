"""``medmnist:<name>[@<size>]``: the 2D MedMNIST v2 ``.npz`` files (Yang et al., Scientific Data 2023).

File lookup under the data root, for each candidate size: ``<root>/<name>/<name>_<size>.npz``,
``<root>/<name>_<size>.npz``, and for size 28 also ``<root>/<name>/<name>.npz`` / ``<root>/<name>.npz``
(the upstream names). Size: ``@size`` if given; else ``image_size`` when a file of that size exists;
else the smallest available file at least ``image_size`` (else the largest), resized to ``image_size``.
With ``image_size`` unset the file's own size is kept.

A missing file is downloaded through the optional ``medmnist`` package only when ``download`` is true.

Keys ``{train,val,test}_{images,labels}`` give the official splits. Images ``[N, H, W]`` or
``[N, H, W, 3]`` uint8 are scaled by / 255 to float32 [0, 1], converted to ``channels`` (ITU-R 601
luma for RGB -> grey; grey repeated for 3 channels) and resized (bilinear, antialiased) when needed.
Labels ``[N, 1]`` are class indices (task ``binary`` for 2 classes, else ``multiclass``); ``[N, K]``
with ``K > 1`` (ChestMNIST) are multi-label {0, 1} (task ``multilabel``). RetinaMNIST's ordinal
grades are read as ``multiclass``.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from medpretrain.config import DataConfig
from medpretrain.data.base import DatasetSpec, Source
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.spec import MEDMNIST_SIZES
from medpretrain.data.transforms import LUMA_601, resize

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# MedMNIST v2 2D sets: number of classes (from medmnist.INFO), and class names where they are short.
NUM_CLASSES: dict[str, int] = {
    "pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2,
    "retinamnist": 5, "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11,
    "organcmnist": 11, "organsmnist": 11,
}
CLASS_NAMES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
}


def candidate_paths(root: Path, name: str, size: int) -> list[Path]:
    """Where a ``name`` file of ``size`` may lie, in lookup order."""
    paths = [root / name / f"{name}_{size}.npz", root / f"{name}_{size}.npz"]
    if size == 28:
        paths += [root / name / f"{name}.npz", root / f"{name}.npz"]
    return paths


def find_file(root: Path, name: str, size: int | None, image_size: int | None) -> Path | None:
    """The npz to read (see the module docstring), or None when no candidate exists."""
    if size is not None:
        sizes = [size]
    elif image_size in MEDMNIST_SIZES:
        larger = [s for s in MEDMNIST_SIZES if s > image_size]  # type: ignore[operator]
        smaller = [s for s in MEDMNIST_SIZES if s < image_size][::-1]  # type: ignore[operator]
        sizes = [image_size, *larger, *smaller]  # type: ignore[list-item]
    else:
        target = image_size or 0
        sizes = [s for s in MEDMNIST_SIZES if s >= target] + [s for s in MEDMNIST_SIZES if s < target][::-1]
    for s in sizes:
        for p in candidate_paths(root, name, s):
            if p.is_file():
                return p
    return None


def medmnist_files(spec: DatasetSpec, cfg: DataConfig) -> list[Path]:
    """The one npz behind ``spec`` (for the data stamp; nothing is read or downloaded). Raises DataError."""
    root = spec.root or Path(".")
    found = find_file(root, spec.name or "", spec.size, cfg.image_size)
    if found is None:
        raise DataError(spec.text, f"no MedMNIST file for it under {root}")
    return [found]


def download(root: Path, name: str, size: int) -> Path:
    """Fetch ``name`` at ``size`` into ``root`` with the optional ``medmnist`` package (needs a network)."""
    target = candidate_paths(root, name, size)[1 if size != 28 else 3]
    try:
        import medmnist  # optional dependency: pip install 'medpretrain[download]'
    except ImportError:
        raise DataError(target, "file missing and data.download=true needs the optional 'medmnist' package "
                                "(pip install 'medpretrain[download]')") from None
    info = getattr(medmnist, "INFO", {}).get(name)
    if info is None:
        raise DataError(target, f"'{name}' is not a MedMNIST dataset known to the medmnist package")
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls = getattr(medmnist, info["python_class"])
        cls(split="train", download=True, root=str(root), size=size)
    except Exception as e:  # network, permissions, package API: report one clear line
        raise DataError(target, f"MedMNIST download failed ({type(e).__name__}: {e})") from None
    found = find_file(root, name, size, None)
    if found is None:
        raise DataError(target, "MedMNIST download finished but the file is not where expected")
    return found


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
            if missing:
                raise DataError(path, f"missing key(s) {', '.join(missing)} (has: {', '.join(npz.files) or 'none'})")
            return {k: npz[k] for k in npz.files if k.split("_", 1)[0] in SPLITS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(path, f"not a readable .npz file ({e})") from None


def _check(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Validate shapes and dtypes of the six MedMNIST arrays."""
    width = None
    for s in SPLITS:
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)) or x.shape[1] != x.shape[2]:
            raise DataError(path, f"{s}_images has shape {x.shape}; expected [N, H, W] or [N, H, W, 3] square")
        if x.dtype != np.uint8:
            raise DataError(path, f"{s}_images has dtype {x.dtype}; expected uint8")
        if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
            raise DataError(path, f"{s}_labels has shape {y.shape}; expected [{x.shape[0]}] or [{x.shape[0]}, K]")
        k = 1 if y.ndim == 1 else y.shape[1]
        if width is not None and k != width:
            raise DataError(path, f"{s}_labels has {k} columns, other splits have {width}")
        width = k
        if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
            raise DataError(path, f"{s}_labels must be non-negative integers")
        if x.shape[0] == 0 and s == "train":
            raise DataError(path, "train split is empty")


def _channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """``[N, C, H, W]`` to ``channels``: ITU-R 601 luma for RGB -> grey, repetition for grey -> RGB."""
    if batch.shape[1] == channels:
        return batch
    if channels == 1:
        return np.einsum("c,nchw->nhw", LUMA_601, batch)[:, None]
    return np.repeat(batch, 3, axis=1)


def read_medmnist_source(name: str, size: int | None, root: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read ``medmnist:<name>[@size]`` under ``root``; see the module docstring.

    A bad npz always raises DataError (one file: there is nothing left to skip to), even with skip_bad.
    """
    path = find_file(root, name, size, cfg.image_size)
    if path is None:
        want = size or (cfg.image_size if cfg.image_size in MEDMNIST_SIZES else 28)
        if cfg.download:
            path = download(root, name, want)  # type: ignore[arg-type]
        else:
            tried = candidate_paths(root, name, want)  # type: ignore[arg-type]
            raise DataError(tried[0], f"MedMNIST file not found (also tried {', '.join(map(str, tried[1:]))}); "
                                      "set MEDPRETRAIN_DATA or data.root, or pass data.download=true")
    arrays = _load_npz(path)
    _check(path, arrays)
    out_size = cfg.image_size or int(arrays["train_images"].shape[1])
    total = sum(len(arrays[f"{s}_images"]) for s in SPLITS)
    images = np.empty((total, cfg.channels, out_size, out_size), dtype=np.float32)  # one allocation
    labels, names, official = [], [], {}
    start = 0
    for s in SPLITS:
        x = arrays[f"{s}_images"]
        x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)
        for i in range(0, len(x), 2048):  # chunks keep the float copy of large sets bounded
            chunk = x[i:i + 2048].astype(np.float32) / 255.0
            images[start + i:start + i + len(chunk)] = resize(_channels(chunk, cfg.channels), out_size)
        labels.append(arrays[f"{s}_labels"])
        names += [f"{path.name}[{s}:{i}]" for i in range(len(x))]
        official[s] = np.arange(start, start + len(x))
        start += len(x)
    y = np.concatenate(labels)
    if y.ndim == 2 and y.shape[1] > 1:
        task, lab = "multilabel", y.astype(np.int64)
        k = y.shape[1]
    else:
        lab = y.reshape(-1).astype(np.int64)
        k = max(NUM_CLASSES.get(name, 0), int(lab.max()) + 1 if lab.size else 0)
        if name in NUM_CLASSES and lab.size and lab.max() >= NUM_CLASSES[name]:
            raise DataError(path, f"label {int(lab.max())} out of range for {name} ({NUM_CLASSES[name]} classes)")
        task = "binary" if k == 2 else "multiclass"
    class_names = CLASS_NAMES.get(name, [])
    if len(class_names) != k:
        class_names = [str(i) for i in range(k)]
    return Source(
        images=images, task=task, names=names, files=[path],  # type: ignore[arg-type]
        labels=lab, class_names=class_names, official_splits=official,
    )
