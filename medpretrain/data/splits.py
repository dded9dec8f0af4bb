"""Train / val / test splits and label fractions, seeded and stratified.

Splits (:func:`make_splits`):

* official splits are used when the source has them (MedMNIST, DRIVE); a missing official ``val`` is
  carved out of the official ``train`` with ``val_fraction`` of it (stratified, at least one sample);
* otherwise ``test_fraction`` and ``val_fraction`` of all samples are drawn stratified by label, seeded
  by ``split_seed``. Per class the counts are rounded so that totals match (largest remainder).
* with ``groups`` (patients) whole groups are assigned, greedily, biggest first, each to the split whose
  per-class deficit it fills best; no group is ever in two splits, proportions are approximate.

The stratification key is the class index; multi-label samples use their first positive label
(``K`` when none is positive); unlabeled and segmentation samples form one stratum.

Groups (:func:`group_samples`) join samples that must stay on one side: the source's patient keys
(a manifest's ``patient`` column, DICOM PatientID, a NIfTI volume), a key taken from each sample's path by
``data.group_regex``, and near-duplicate images (:mod:`medpretrain.data.duplicates`, ``data.dedup``),
merged transitively (union-find). Without patient keys or a regex, and when no near-duplicates are found,
the split is the plain stratified one above (so such a source splits exactly as before grouping existed).

k-fold cross-validation (``cv_folds = k > 1``, :func:`make_splits`): the (grouped) samples are dealt into
``k`` folds by the same greedy per-class rule, one partition per ``split_seed`` whatever the fold; fold
``cv_fold`` is the test set, ``val_fraction`` of the other folds' samples (grouped, stratified) is the
validation set, the rest trains. ``test_fraction`` is not used. Official splits and folds do not mix.

Label fractions (:func:`subsample_train`) come from the train split only, stratified per class
(``max(1, round(fraction * n_c))`` or ``min(n_c, labels_per_class)``), seeded by the subset seed
(``data.subset_seed``; by default the run's seed, see :func:`medpretrain.data.build_dataset`): every seed
draws a subset of the same size and class counts, the split (``split_seed``) stays fixed. For one seed the
draws are nested: the 1 % subset is inside the 10 % subset.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from medpretrain.config import ConfigError
from medpretrain.data.duplicates import DEDUP_METHODS, key_pairs, near_pairs, threshold_for, union_find
from medpretrain.data.errors import DataError

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def strata(labels: np.ndarray | None, n: int) -> np.ndarray:
    """Stratification key per sample (see the module docstring)."""
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    if labels.ndim == 2:
        pos = labels > 0
        return np.where(pos.any(axis=1), pos.argmax(axis=1), labels.shape[1]).astype(np.int64)
    return labels.astype(np.int64)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    # Separate streams for splitting and label fractions, so changing one never shifts the other.
    return np.random.default_rng([seed, purpose])


def _round_counts(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class counts that sum to round(fraction * total) (largest remainder)."""
    exact = sizes * fraction
    counts = np.floor(exact).astype(np.int64)
    short = int(round(fraction * sizes.sum())) - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    for i in order[:max(short, 0)]:
        counts[i] += 1
    return counts


def _stratified(indices: np.ndarray, key: np.ndarray, fractions: list[float],
                rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``indices`` into len(fractions) + 1 parts (the rest last), stratified by ``key``."""
    classes = np.unique(key[indices])
    perms = {c: rng.permutation(indices[key[indices] == c]) for c in classes}
    sizes = np.array([len(perms[c]) for c in classes])
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    offsets = np.zeros(len(classes), dtype=np.int64)
    for j, frac in enumerate(fractions):
        counts = _round_counts(sizes, frac)
        for ci, c in enumerate(classes):
            parts[j].append(perms[c][offsets[ci]:offsets[ci] + counts[ci]])
        offsets += counts
    for ci, c in enumerate(classes):
        parts[-1].append(perms[c][offsets[ci]:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _grouped(key: np.ndarray, groups: np.ndarray, fractions: dict[str, float],
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Assign whole groups to splits, greedily filling per-class targets (see the module docstring)."""
    names = list(fractions)
    uniq, inverse = np.unique(groups, return_inverse=True)
    classes, kidx = np.unique(key, return_inverse=True)
    counts = np.zeros((len(uniq), len(classes)))
    np.add.at(counts, (inverse, kidx), 1)
    target = np.array([[fractions[s] * counts[:, c].sum() for c in range(len(classes))] for s in names])
    active = np.array([fractions[s] > 0 for s in names])
    current = np.zeros_like(target)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    assign = np.zeros(len(uniq), dtype=np.int64)
    for g in order:
        need = target - current
        score = (need * counts[g]).sum(axis=1) / counts[g].sum()
        total = need.sum(axis=1)
        score = np.where(active, score, -np.inf)
        best = max(range(len(names)), key=lambda s: (score[s], total[s]))
        assign[g] = best
        current[best] += counts[g]
    return {s: np.flatnonzero(assign[inverse] == i) for i, s in enumerate(names)}


def make_splits(labels: np.ndarray | None, n: int, *, groups: np.ndarray | None = None,
                official: dict[str, np.ndarray] | None = None, val_fraction: float = 0.1,
                test_fraction: float = 0.2, seed: int = 0, cv_folds: int = 0,
                cv_fold: int = 0) -> dict[str, np.ndarray]:
    """Sorted sample indices for ``train``, ``val`` and ``test`` (disjoint, covering all samples).

    ``cv_folds > 1``: fold ``cv_fold`` of a k-fold partition is ``test`` (see the module docstring).
    Raises ValueError for fractions outside [0, 1) or summing to 1 or more, and for folds that do not fit.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    key = strata(labels, n)
    if cv_folds < 0:
        raise ValueError(f"data.cv_folds must be 0 (off) or at least 2, got {cv_folds}")
    if cv_folds <= 1 and cv_fold != 0:
        raise ValueError(f"data.cv_fold={cv_fold} needs data.cv_folds > 1 (got {cv_folds})")
    if cv_folds > 1:
        if official:
            raise ValueError("data.cv_folds needs a source without official splits (this one has them)")
        return _cv_splits(key, n, groups, cv_folds, cv_fold, val_fraction, seed)
    rng = _rng(seed, 0)
    if official:
        out = {s: np.sort(np.asarray(official.get(s, np.zeros(0, np.int64)), dtype=np.int64)) for s in SPLIT_NAMES}
        if "val" not in official:
            train = out["train"]
            if len(train) < 2:
                raise ValueError("official train split too small to carve a validation split from")
            frac = max(val_fraction, 1.0 / len(train))
            if groups is not None and len(np.unique(np.asarray(groups)[train])) > 1:
                # whole groups (patients) go to validation: none spans train and val
                gid = np.asarray(groups)[train]
                parts = _grouped(key[train], gid, {"val": frac, "train": 1.0 - frac}, rng)
                val, rest = np.sort(train[parts["val"]]), np.sort(train[parts["train"]])
                if len(val) == 0:  # rounding: at least one validation group
                    first = gid == gid[0]
                    val, rest = train[first], train[~first]
            else:
                val, rest = _stratified(train, key, [frac], rng)
                if len(val) == 0:  # rounding: at least one validation sample
                    val, rest = rest[:1], rest[1:]
            out["train"], out["val"] = rest, val
        return out
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if groups is not None:
        fractions = {"test": test_fraction, "val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
        parts = _grouped(key, np.asarray(groups), fractions, rng)
        return {s: parts[s] for s in SPLIT_NAMES}
    test, val, train = _stratified(np.arange(n), key, [test_fraction, val_fraction], rng)
    return {"train": train, "val": val, "test": test}


def _cv_splits(key: np.ndarray, n: int, groups: np.ndarray | None, folds: int, fold: int,
               val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Fold ``fold`` of ``folds`` as test, validation from the other folds (see the module docstring)."""
    if not 0 <= fold < folds:
        raise ValueError(f"data.cv_fold must be in 0..{folds - 1} for data.cv_folds={folds}, got {fold}")
    gid = np.asarray(groups) if groups is not None else np.arange(n)
    n_groups = len(np.unique(gid))
    if n_groups < folds:
        raise ValueError(f"data.cv_folds={folds} needs at least {folds} groups, the data has {n_groups}")
    assign = fold_ids(key, gid, folds, seed)
    test = np.flatnonzero(assign == fold)
    rest = np.flatnonzero(assign != fold)
    rng = np.random.default_rng([seed, 3, fold])
    if groups is None:
        val, train = _stratified(rest, key, [val_fraction], rng)
    else:
        parts = _grouped(key[rest], gid[rest], {"val": val_fraction, "train": 1.0 - val_fraction}, rng)
        val, train = rest[parts["val"]], rest[parts["train"]]
    return {"train": train, "val": val, "test": test}


def fold_ids(key: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``[N]`` fold index per sample: whole groups dealt into ``folds`` equal parts, per class (greedy)."""
    parts = _grouped(key, np.asarray(groups), {str(i): 1.0 / folds for i in range(folds)}, _rng(seed, 2))
    out = np.empty(len(key), dtype=np.int64)
    for i in range(folds):
        out[parts[str(i)]] = i
    return out


def compile_group_regex(pattern: str) -> re.Pattern[str]:
    """``data.group_regex`` compiled; raises ConfigError when it is not a valid regular expression."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"data.group_regex {pattern!r} is not a valid regular expression: {e}") from None


def regex_keys(paths: Sequence[str], pattern: str) -> np.ndarray:
    """The group key of each path: ``re.search(pattern, path)``'s group ``group``, else its first group
    (the whole match when there is no group, or when that group took no part in the match, as in the
    alternative of ``(sub-\\d+)_|^extra``). Raises DataError naming the first path that does not match."""
    rx = compile_group_regex(pattern)
    which: int | str = "group" if "group" in rx.groupindex else (1 if rx.groups else 0)
    keys = []
    for p in paths:
        m = rx.search(p)
        if m is None:
            raise DataError(p, f"does not match data.group_regex {pattern!r} (every sample needs a group key; "
                               "widen the regex, e.g. with an alternative)")
        keys.append(m.group(which) if m.group(which) is not None else m.group(0))
    return np.asarray(keys, dtype=str)


def group_samples(n: int, *, groups: np.ndarray | None = None, paths: Sequence[str] | None = None,
                  group_regex: str | None = None, thumbs: np.ndarray | None = None, dedup: str = "none",
                  dedup_threshold: float | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Group key per sample for :func:`make_splits`, and what was found (see the module docstring).

    ``groups``: the source's patient keys; ``paths``: what ``group_regex`` is matched against;
    ``thumbs``: ``[N, 32, 32]`` thumbnails for ``dedup`` (``pixels`` / ``phash`` / ``none``).
    Returns ``(keys, info)``: ``keys`` is ``None`` when nothing groups any two samples and no patient keys
    or regex were given (the split is then the plain stratified one); the patient keys themselves when
    the other keys add no link; else ``[N]`` int64 component labels. ``info`` holds plain numbers for
    results files: ``groups``, ``multi_image_groups``, ``images_in_multi_image_groups``, ``largest_group``,
    ``near_duplicate_pairs``, ``dedup``, ``dedup_threshold``, ``group_regex``, ``patient_keys``, ``seconds``.
    Raises ConfigError for an unknown method or a bad regex, DataError for a path the regex misses.
    """
    t0 = time.perf_counter()
    if dedup not in DEDUP_METHODS:
        raise ConfigError(f"data.dedup must be one of {', '.join(DEDUP_METHODS)}, got {dedup!r}")
    links = []
    if groups is not None:
        links.append(key_pairs(groups))
    if group_regex:
        if paths is None or len(paths) != n:
            raise ValueError(f"group_regex needs one path per sample ({n}), got {0 if paths is None else len(paths)}")
        links.append(key_pairs(regex_keys(paths, group_regex)))
    n_dup = 0
    thr: float | None = None
    if dedup != "none" and thumbs is not None:
        try:
            thr = threshold_for(dedup, dedup_threshold)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dup = near_pairs(thumbs, dedup, thr)
        n_dup = len(dup)
        links.append(dup)
    pairs = np.concatenate(links) if links else np.zeros((0, 2), np.int64)
    labels = union_find(n, pairs)
    sizes = np.bincount(labels, minlength=n)
    sizes = sizes[sizes > 0]
    info: dict[str, Any] = {
        "groups": int(len(sizes)), "multi_image_groups": int((sizes > 1).sum()),
        "images_in_multi_image_groups": int(sizes[sizes > 1].sum()), "largest_group": int(sizes.max(initial=0)),
        "near_duplicate_pairs": n_dup, "dedup": dedup if thr is not None else "none", "dedup_threshold": thr,
        "group_regex": group_regex or None, "patient_keys": groups is not None,
    }
    if groups is not None and info["groups"] == len(np.unique(groups)):
        keys: np.ndarray | None = np.asarray(groups)  # nothing added to the patient keys: split as before
    elif groups is None and not group_regex and info["multi_image_groups"] == 0:
        keys = None
    else:
        keys = labels
    info["seconds"] = round(time.perf_counter() - t0, 4)
    return keys, info


def subsample_train(train: np.ndarray, labels: np.ndarray | None, *, fraction: float | None = None,
                    per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """The labelled subset of ``train`` (sorted indices); see the module docstring.

    ``labels`` are the source's labels (indexed by ``train``); ``None`` (segmentation) draws a fraction
    of the images. Raises ValueError for a fraction outside (0, 1], ``per_class < 1``, both options
    set, or ``per_class`` without labels.
    """
    if fraction is not None and per_class is not None:
        raise ValueError("set either label_fraction or labels_per_class, not both")
    if fraction is None and per_class is None:
        return train
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"labels_per_class must be >= 1, got {per_class}")
    if per_class is not None and labels is None:
        raise ValueError("labels_per_class needs a labelled (classification) dataset")
    if fraction == 1.0:
        return train
    key = strata(labels, int(train.max()) + 1 if len(train) else 0)
    rng = _rng(seed, 1)
    keep = []
    for c in np.unique(key[train]):
        members = rng.permutation(train[key[train] == c])
        if per_class is not None:
            k = min(len(members), per_class)
        else:
            k = max(1, round(float(fraction) * len(members)))  # type: ignore[arg-type]
        keep.append(members[:k])
    return np.sort(np.concatenate(keep)) if keep else train
