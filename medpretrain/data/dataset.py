"""From a config to a torch Dataset: :func:`read_source` (decode once per process) and :func:`build_dataset`.

Every stage builds its data the same way::

    train = build_dataset(cfg.data, "train")                  # labelled, label_fraction applied
    pre = build_dataset(cfg.data, "all", unlabeled=True)      # pretraining: train + val, never test

Samples are dicts (MONAI style): ``image`` float32 ``[C, H, W]``; ``label`` int64 ``[]`` (binary /
multiclass) or float32 ``[K]`` (multilabel), absent when unlabeled; ``mask`` and ``roi`` float32
``[1, H, W]`` for segmentation (roi all ones when the source has none); ``index`` the position in the
dataset (``dataset.names[index]`` names it).

A ``transform`` receives the sample with ``image`` still in [0, 1] and returns a sample; the
normalisation ``(x - mean) / std`` is applied afterwards to ``image`` (a tensor, or each tensor of a
list / tuple of views).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import retina
from medpretrain.data.base import DatasetSpec, Source, Task
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.manifest import is_manifest, table_files
from medpretrain.data.privacy import project_salt
from medpretrain.data.readers import READERS
from medpretrain.data.spec import data_root, parse_spec
from medpretrain.data.splits import group_samples, make_splits, subsample_train
from medpretrain.utils import hash_files, sha256_file

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test", "all")

_SOURCE_CACHE: dict[tuple, Source] = {}
_HASH_CACHE: dict[tuple, str] = {}
_GROUP_CACHE: dict[tuple, tuple[Source, np.ndarray | None, dict[str, Any]]] = {}


def _cache_key(cfg: DataConfig) -> tuple:
    return (cfg.dataset.strip(), str(data_root(cfg)), cfg.image_size, cfg.channels, cfg.window,
            cfg.slice_axis, cfg.skip_bad, cfg.max_pixels, project_salt(), cfg.path_column, cfg.label_column,
            tuple(cfg.label_columns or ()), tuple(cfg.classes or ()), cfg.patient_column, cfg.split_column,
            *retina.cache_key(cfg), cfg.cache, cfg.cache_above_mb if cfg.cache == "auto" else None, cfg.stream)


def clear_source_cache() -> None:
    """Forget decoded sources and their groups (tests; or to free memory between experiments)."""
    _SOURCE_CACHE.clear()
    _GROUP_CACHE.clear()


def _decode(cfg: DataConfig) -> Source:
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {cfg.channels}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {cfg.image_size}")
    if cfg.max_pixels < 0:
        raise ConfigError(f"data.max_pixels must be positive or 0 (no limit), got {cfg.max_pixels}")
    spec = parse_spec(cfg.dataset, data_root(cfg))
    retina.check_scheme(cfg, spec.scheme)  # green / CLAHE / derived field of view: segpairs and drive only
    reader = READERS[spec.scheme]
    if cfg.stream:  # images decoded on access, in the DataLoader workers
        from medpretrain.data.stream import read_streamed

        return read_streamed(spec, reader, cfg, SkipLog(skip_bad=cfg.skip_bad))
    if cfg.cache:  # images in the on-disk cache (None: data.cache=auto found the set small)
        from medpretrain.data.cache import read_cached

        cached = read_cached(spec, reader, cfg, SkipLog(skip_bad=cfg.skip_bad))
        if cached is not None:
            return cached
    return reader.read(spec, cfg, SkipLog(skip_bad=cfg.skip_bad))


def read_source(cfg: DataConfig) -> Source:
    """The decoded :class:`Source` for ``cfg``, cached per process.

    Cache key: dataset spec, data root, image_size, channels, window, slice_axis, skip_bad, max_pixels, the
    salt, the manifest column options, the retinal options (:mod:`medpretrain.data.retina`), ``data.cache``
    (with ``cache: on`` the images are :class:`medpretrain.data.cache.CachedImages` read from disk) and
    ``data.stream`` (:class:`medpretrain.data.stream.StreamedImages`, decoded on access). The returned
    object is shared: do not modify it. Skipped files are logged once, here.
    Raises :class:`DataError` for a bad spec or bad input (unless ``skip_bad``).
    """
    key = _cache_key(cfg)
    if key not in _SOURCE_CACHE:
        source = _decode(cfg)
        if len(source) == 0:
            raise DataError(cfg.dataset, "no samples could be read")
        if source.skipped:
            log.warning("%s: %s", cfg.dataset, SkipLog(True, source.skipped).summary())
        log.info("%s: %d samples, task %s", cfg.dataset, len(source), source.task)
        _SOURCE_CACHE[key] = source
    return _SOURCE_CACHE[key]


def fingerprint(files: list[Path], store: Path | None = None) -> str:
    """Content hash of the source files: the ``dataset_hash`` of exports.

    One file (a MedMNIST npz): the first 16 hex digits of its sha256, as ``sha256sum`` prints.
    Several files: :func:`medpretrain.utils.hash_files` (sha256 over each file's name and content digest, in
    path order). With ``store`` (the digest store, :data:`DIGESTS_FILE`) the digests :func:`data_stamp` has
    already read are reused, so a large set is not read twice; the value is the same either way. Without it
    the result is cached per process by path, size and mtime.
    """
    existing = [p for p in files if p.is_file()]  # a missing file skipped under skip_bad has no content
    if store is not None:
        digests = dict(zip(map(str, existing), _stored_digests(existing, store), strict=True))
        return digests[str(existing[0])][:16] if len(existing) == 1 else hash_files(existing, digests)
    key = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in existing))
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(existing[0])[:16] if len(existing) == 1 else hash_files(list(existing))
    return _HASH_CACHE[key]


def data_stamp(cfg: DataConfig) -> str:
    """Identity of the files behind ``cfg.dataset``: sha256 of (path relative to the data root, size, content
    digest) of every file (a manifest's rows' files included), without decoding anything.

    Content, not modification times, so a copy of the same data (another machine, a fresh checkout of the
    shared folder) keeps every finished stage, grid cell and image cache reusable. Each file's digest is read
    once per machine: :func:`file_digests` remembers it under (path, size, mtime), so later stamps cost one
    ``stat`` per file. Used to decide whether a finished stage can be reused. Raises :class:`DataError`
    naming the spec when its files do not exist.
    """
    import hashlib

    root = data_root(cfg)
    spec = parse_spec(cfg.dataset, root)
    listed = READERS[spec.scheme].files(spec, cfg)
    files = sorted(listed if listed is not None else _files_under(spec, cfg))
    digests = file_digests(files, cfg)
    h = hashlib.sha256(cfg.dataset.encode())
    for f, digest in zip(files, digests, strict=True):
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        h.update(f"{rel}\0{f.stat().st_size}\0{digest}\n".encode())
    return h.hexdigest()[:16]


DIGESTS_FILE = "file_digests.json"
"""Beside the image caches (:func:`medpretrain.data.cache.cache_root`): content digests of data files, keyed by a
salted hash of the absolute path (no file name or path is written, :mod:`medpretrain.data.privacy`)."""

_DIGESTS: dict[str, Any] = {}  # salted path key -> [size, mtime_ns, sha256], this process's view of the store
# named under the key "" (never written)


def digest_store(cfg: DataConfig) -> Path:
    """The digest store of ``cfg``'s cache folder (:func:`medpretrain.data.cache.cache_root`)."""
    from medpretrain.data.cache import cache_root

    return cache_root(cfg) / DIGESTS_FILE


def file_digests(files: list[Path], cfg: DataConfig) -> list[str]:
    """sha256 (16 hex digits) of each file's content, from the digest store of ``cfg``'s cache folder
    (:func:`_stored_digests`)."""
    return [d[:16] for d in _stored_digests(files, digest_store(cfg))]


def _stored_digests(files: list[Path], store: Path) -> list[str]:
    """Full sha256 (64 hex digits) of each file's content, taken from ``store`` while the file's size and
    mtime are those recorded, else read (and the store updated, atomically; concurrent writers only lose
    entries, which are then read again). An entry of the earlier 16-digit store is read again once."""
    import json

    from medpretrain.data.privacy import salted_key
    from medpretrain.utils import atomic_write_text

    if _DIGESTS.get("") != str(store):  # this process's view belongs to one store at a time
        _DIGESTS.clear()
        _DIGESTS[""] = str(store)
        if store.is_file():
            try:
                _DIGESTS.update(json.loads(store.read_text()))
            except (OSError, ValueError):
                pass  # an unreadable store is rebuilt
    out, new = [], 0
    for f in files:
        st = f.stat()
        key = salted_key(str(f.resolve()))
        hit = _DIGESTS.get(key)
        if not isinstance(hit, list) or hit[:2] != [st.st_size, st.st_mtime_ns] or len(str(hit[2])) != 64:
            _DIGESTS[key] = hit = [st.st_size, st.st_mtime_ns, sha256_file(f)]
            new += 1
        out.append(str(hit[2]))
    if new:
        try:
            merged = json.loads(store.read_text()) if store.is_file() else {}
        except (OSError, ValueError):
            merged = {}
        merged.update({k: v for k, v in _DIGESTS.items() if k})
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(store, json.dumps(merged, separators=(",", ":")))
        except OSError as e:  # a read-only cache folder costs speed, never correctness
            log.debug("cannot write %s (%s)", store, e)
    return out


def _files_under(spec: DatasetSpec, cfg: DataConfig) -> list[Path]:
    """The files under a spec's paths: a manifest and the files its rows name, a file, or a folder's files."""
    files: list[Path] = []
    for p in spec.paths:
        if is_manifest(p):
            files += table_files(p, cfg)
        elif p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file()]
        else:
            raise DataError(str(p), f"does not exist (dataset {cfg.dataset})")
    return files


def source_groups(source: Source, cfg: DataConfig) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Group keys of ``source`` for splitting (patient keys, ``data.group_regex``, near-duplicates by
    ``data.dedup``) and what was found (:func:`medpretrain.data.splits.group_samples`).

    Computed once per source and grouping options (cached beside the decoded source); sources with an
    official split are not grouped. Raises ConfigError for bad options, DataError for a path the regex misses.
    """
    if source.official_splits:
        return source.groups, {"dedup": "none", "dedup_skipped": "official split", "group_regex": None}
    key = (id(source), cfg.dedup, cfg.dedup_threshold, cfg.group_regex)
    hit = _GROUP_CACHE.get(key)
    if hit is None or hit[0] is not source:
        keys, info = group_samples(
            len(source), groups=source.groups, paths=source.paths if source.paths is not None else source.names,
            group_regex=cfg.group_regex, thumbs=source.thumbs, dedup=cfg.dedup, dedup_threshold=cfg.dedup_threshold,
        )
        if cfg.dedup != "none" and source.thumbs is None:
            info["dedup_skipped"] = "this reader keeps no thumbnails (grouped by patient / volume keys only)"
        if info["near_duplicate_pairs"]:
            log.info("%s: %d near-duplicate pair(s) (%s <= %g) -> %d group(s), %d image(s) in %d multi-image "
                     "group(s), %.2fs", cfg.dataset, info["near_duplicate_pairs"], info["dedup"],
                     info["dedup_threshold"], info["groups"], info["images_in_multi_image_groups"],
                     info["multi_image_groups"], info["seconds"])
        _GROUP_CACHE[key] = hit = (source, keys, info)
    return hit[1], dict(hit[2])


def split_indices(source: Source, cfg: DataConfig) -> dict[str, np.ndarray]:
    """``train`` / ``val`` / ``test`` indices of ``source`` under ``cfg`` (see :mod:`.splits`).

    Raises ConfigError for bad fractions or folds.
    """
    groups, _ = source_groups(source, cfg)
    try:
        return make_splits(
            source.labels, len(source), groups=groups, official=source.official_splits,
            val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
            cv_folds=cfg.cv_folds, cv_fold=cfg.cv_fold,
        )
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def split_info(source: Source, cfg: DataConfig, parts: dict[str, np.ndarray]) -> dict[str, Any]:
    """How ``source`` was split under ``cfg``, as plain values for results files and reports: ``method``
    (``official`` / ``stratified`` / ``grouped`` / ``cv``), ``split_seed``, ``cv_folds``, ``cv_fold``,
    ``sizes``, and the grouping counts of :func:`source_groups` (``groups``, ``multi_image_groups``,
    ``images_in_multi_image_groups``, ``largest_group``, ``near_duplicate_pairs``, ``dedup``, ...)."""
    groups, info = source_groups(source, cfg)
    if source.official_splits:
        method = "official"
    elif cfg.cv_folds > 1:
        method = "cv"
    else:
        method = "stratified" if groups is None else "grouped"
    return {"method": method, "split_seed": cfg.split_seed, "cv_folds": cfg.cv_folds, "cv_fold": cfg.cv_fold,
            "sizes": {s: int(len(v)) for s, v in parts.items()}, **info}


class MedicalDataset(Dataset):
    """One split of a :class:`Source` as a map-style dataset (see the module docstring for the sample).

    Attributes: ``task`` (``unlabeled`` when built unlabeled), ``num_classes`` (segmentation: 1,
    the foreground), ``class_names``, ``in_channels``, ``labels`` (this split's, or None), ``fingerprint``,
    ``spec``, ``split``, ``skipped`` (``(file, reason)`` pairs skipped at decode), ``mean``, ``std``,
    ``names``, ``indices`` (into the source), ``split_info`` (how the source was split and grouped, and
    for a label subset its ``subset_seed`` and ``subset_size``; see :func:`split_info`).
    """

    def __init__(self, source: Source, indices: np.ndarray, *, spec: str, split: str, in_channels: int,
                 mean: float, std: float, unlabeled: bool = False, normalize: bool = True,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 split_info: dict[str, Any] | None = None, digest_store: Path | None = None):
        if std <= 0:
            raise ValueError(f"data.std must be positive, got {std}")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.spec, self.split = spec, split
        self.in_channels = in_channels
        self.mean, self.std = float(mean), float(std)
        self.normalize, self.transform = normalize, transform
        self.unlabeled = unlabeled or source.task == "unlabeled"
        self.task: Task = "unlabeled" if self.unlabeled else source.task
        self.class_names = list(source.class_names)
        self.num_classes = 1 if source.task == "segmentation" else len(self.class_names)
        has_labels = source.labels is not None and not self.unlabeled
        self.labels = source.labels[self.indices] if has_labels else None  # type: ignore[index]
        self.names = [source.names[i] for i in self.indices]
        self.skipped = list(source.skipped)
        self.split_info: dict[str, Any] = dict(split_info or {})
        self.digest_store = digest_store  # where data_stamp's file digests are kept, reused by fingerprint
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Content hash of the whole source (all splits), computed on first use."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.source.files, self.digest_store)
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.indices)

    def _norm(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (x - self.mean) / self.std
        if isinstance(x, (list, tuple)):
            return type(x)(self._norm(v) for v in x)
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        src = self.source
        sample: dict[str, Any] = {"image": torch.from_numpy(np.array(src.images[j], dtype=np.float32)), "index": i}
        if not self.unlabeled:
            if src.labels is not None:
                y = src.labels[j]
                sample["label"] = (torch.as_tensor(y, dtype=torch.float32) if self.task == "multilabel"
                                   else torch.as_tensor(int(y), dtype=torch.int64))
            if src.masks is not None:
                sample["mask"] = torch.from_numpy(np.array(src.masks[j], dtype=np.float32))
                sample["roi"] = (torch.from_numpy(np.array(src.rois[j], dtype=np.float32)) if src.rois is not None
                                 else torch.ones_like(sample["mask"]))
        if self.transform is not None:
            sample = self.transform(sample)
        if self.normalize:
            sample["image"] = self._norm(sample["image"])
        return sample

    def __repr__(self) -> str:
        return (f"MedicalDataset({self.spec!r}, split={self.split}, n={len(self)}, task={self.task}, "
                f"classes={self.num_classes}, channels={self.in_channels})")


def subset_seed(cfg: DataConfig, seed: int | None = None) -> int:
    """The seed of the label subset: ``data.subset_seed`` if set, else the run's ``seed``, else ``split_seed``."""
    if cfg.subset_seed is not None:
        return cfg.subset_seed
    return seed if seed is not None else cfg.split_seed


def build_dataset(cfg: DataConfig, split: str, *, unlabeled: bool = False, normalize: bool = True,
                  transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  seed: int | None = None) -> MedicalDataset:
    """The ``split`` (train / val / test / all) of ``cfg.dataset`` as a :class:`MedicalDataset`.

    ``all`` is train + val (never test), for pretraining. ``label_fraction`` / ``labels_per_class``
    shrink the labelled ``train`` split only (not when ``unlabeled``), drawn by :func:`subset_seed`:
    ``data.subset_seed``, else ``seed`` (the run's seed: fine-tuning passes ``seed=cfg.seed``), else
    ``split_seed``. The split itself follows ``split_seed`` only. Raises ValueError for an unknown split or
    bad options, and DataError for bad data or an empty split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = read_source(cfg)
    parts = split_indices(source, cfg)
    info = split_info(source, cfg, parts)
    if split == "all":
        indices = np.sort(np.concatenate([parts["train"], parts["val"]]))
    else:
        indices = parts[split]
    if split == "train" and not unlabeled and source.task != "unlabeled":
        drawn_by = subset_seed(cfg, seed)
        indices = subsample_train(indices, source.labels, fraction=cfg.label_fraction,
                                  per_class=cfg.labels_per_class, seed=drawn_by)
        if cfg.label_fraction is not None or cfg.labels_per_class is not None:
            info.update(subset_seed=drawn_by, subset_size=int(len(indices)))
    if len(indices) == 0:
        grouped = f" in {info['groups']} group(s)" if info["method"] in ("grouped", "cv") else ""
        raise DataError(cfg.dataset, f"split '{split}' is empty (val_fraction={cfg.val_fraction}, "
                                     f"test_fraction={cfg.test_fraction}, {len(source)} samples{grouped})")
    return MedicalDataset(source, indices, spec=cfg.dataset, split=split, in_channels=cfg.channels,
                          mean=cfg.mean, std=cfg.std, unlabeled=unlabeled, normalize=normalize,
                          transform=transform, split_info=info, digest_store=digest_store(cfg))
