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

Label fractions (:func:`subsample_train`) come from the train split only, stratified per class
(``max(1, round(fraction * n_c))`` or ``min(n_c, labels_per_class)``), seeded by ``split_seed``.
For one seed the draws are nested: the 1 % subset is inside the 10 % subset.
"""

from __future__ import annotations

import numpy as np

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
                test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted sample indices for ``train``, ``val`` and ``test`` (disjoint, covering all samples).

    Raises ValueError for fractions outside [0, 1) or summing to 1 or more.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    key = strata(labels, n)
    rng = _rng(seed, 0)
    if official:
        out = {s: np.sort(np.asarray(official.get(s, np.zeros(0, np.int64)), dtype=np.int64)) for s in SPLIT_NAMES}
        if "val" not in official:
            train = out["train"]
            if len(train) < 2:
                raise ValueError("official train split too small to carve a validation split from")
            frac = max(val_fraction, 1.0 / len(train))
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
