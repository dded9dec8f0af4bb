"""Splits and label fractions: stratified, grouped, seeded, nested."""

from __future__ import annotations

import numpy as np
import pytest

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset, make_splits, subsample_train


def pneu(root, **kw) -> DataConfig:
    return DataConfig(dataset="medmnist:pneumoniamnist", root=str(root), **kw)


def test_label_fraction_is_stratified_and_reproducible(data_root):
    ds = build_dataset(pneu(data_root, label_fraction=0.1), "train")
    counts = np.bincount(ds.labels)
    assert np.all(np.abs(counts - np.array([388, 3494]) * 0.1) <= 1)  # 38.8 -> 39, 349.4 -> 349
    assert counts.tolist() == [39, 349]
    again = build_dataset(pneu(data_root, label_fraction=0.1), "train")
    other = build_dataset(pneu(data_root, label_fraction=0.1, split_seed=1), "train")
    assert np.array_equal(ds.indices, again.indices)
    assert not np.array_equal(ds.indices, other.indices) and len(other) == len(ds)
    small = build_dataset(pneu(data_root, label_fraction=0.01), "train")
    assert np.bincount(small.labels).tolist() == [4, 35]
    assert set(small.indices) <= set(ds.indices)  # nested for one seed
    assert len(build_dataset(pneu(data_root, label_fraction=0.1), "val")) == 524  # only train shrinks


def test_labels_per_class(data_root):
    ds = build_dataset(pneu(data_root, labels_per_class=5), "train")
    assert np.bincount(ds.labels).tolist() == [5, 5]
    with pytest.raises(ValueError, match="not both"):
        build_dataset(pneu(data_root, labels_per_class=5, label_fraction=0.5), "train")
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
        build_dataset(pneu(data_root, label_fraction=0.0), "train")


def test_tiny_fraction_keeps_one_per_class():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 1)
    keep = subsample_train(np.arange(54), labels, fraction=0.01, seed=3)
    assert np.bincount(labels[keep]).tolist() == [1, 1, 1]


def test_stratified_split_proportions_and_disjoint():
    labels = np.array([0] * 437 + [1] * 210 + [2] * 133)  # BUSI's class sizes
    parts = make_splits(labels, len(labels), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(780))
    assert [len(parts[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    for s, frac in (("test", 0.2), ("val", 0.1)):
        assert np.all(np.abs(np.bincount(labels[parts[s]]) - frac * np.array([437, 210, 133])) <= 1)
    again = make_splits(labels, len(labels), seed=0)
    other = make_splits(labels, len(labels), seed=1)
    assert np.array_equal(again["test"], parts["test"]) and not np.array_equal(other["test"], parts["test"])


def test_grouped_split_never_shares_a_group():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(1, 6, 60))  # 60 patients, 1-5 images each
    labels = (groups % 3 == 0).astype(np.int64)  # label is a patient property
    parts = make_splits(labels, len(labels), groups=groups.astype(str), val_fraction=0.15, test_fraction=0.25)
    sets = {s: set(groups[idx]) for s, idx in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(v) for v in parts.values()) == len(labels)
    n = len(labels)
    assert abs(len(parts["test"]) - 0.25 * n) <= 5 and abs(len(parts["val"]) - 0.15 * n) <= 5
    assert set(labels[parts["test"]]) == {0, 1} and set(labels[parts["val"]]) == {0, 1}


def test_official_split_without_val_carves_val_from_train():
    official = {"train": np.arange(20), "test": np.arange(20, 40)}
    parts = make_splits(None, 40, official=official, val_fraction=0.1, seed=0)
    assert len(parts["val"]) == 2 and len(parts["train"]) == 18 and np.array_equal(parts["test"], np.arange(20, 40))
    assert len(make_splits(None, 40, official=official, val_fraction=0.0)["val"]) == 1  # at least one


def test_multilabel_stratifies_by_first_positive():
    labels = np.zeros((100, 3), np.int64)
    labels[:30, 0] = 1
    labels[30:60, 1] = 1
    labels[:60, 2] = 1  # second positive never used as key
    parts = make_splits(labels, 100, val_fraction=0.1, test_fraction=0.2)
    first = np.where(labels.any(1), labels.argmax(1), 3)
    assert np.bincount(first[parts["test"]], minlength=4).tolist() == [6, 6, 0, 8]
