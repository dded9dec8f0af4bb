"""Metrics against hand-computed values and a naive reference (sklearn, written-out loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medpretrain.metrics import (
    aggregate,
    bootstrap_ci,
    classification_metrics,
    epochs_to_fraction_of_best,
    probabilities,
    roc_curves,
)


def test_binary_hand_computed():
    # Scores 0.1 0.4 | 0.35 0.8 for labels 0 0 | 1 1: of the 4 (neg, pos) pairs only (0.4, 0.35) is
    # mis-ordered -> AUC 3/4. At 0.5 the predictions are 0 0 0 1: TP 1, FN 1, TN 2, FP 0.
    m = classification_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "binary")
    assert m["auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 2)
    assert m["precision"] == pytest.approx(1 / 1)
    assert m["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_multiclass_hand_computed():
    # 3 classes, 6 cases. Arg-max predictions 0 1 1 2 2 0 for targets 0 0 1 1 2 2.
    p = torch.tensor(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]
    )
    t = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(p, t, "multiclass")
    # Per class (TP, FP, FN, TN): c0 (1,1,1,3), c1 (1,1,1,3), c2 (1,1,1,3) -> recall = precision = 1/2,
    # specificity 3/4, F1 1/2 for every class; accuracy 3/6.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.5)
    # Macro one-vs-rest AUC, reference: sklearn.
    assert m["auc"] == pytest.approx(roc_auc_score(t.numpy(), p.numpy(), multi_class="ovr", average="macro"))


def test_multilabel_against_loops():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, size=(50, 4))
    p = np.clip(t * 0.3 + rng.random((50, 4)) * 0.7, 0, 1)
    m = classification_metrics(p, t, "multilabel")
    pred = p >= 0.5
    rec = [((pred[:, k] == 1) & (t[:, k] == 1)).sum() / (t[:, k] == 1).sum() for k in range(4)]
    spec = [((pred[:, k] == 0) & (t[:, k] == 0)).sum() / (t[:, k] == 0).sum() for k in range(4)]
    assert m["sensitivity"] == pytest.approx(np.mean(rec), abs=1e-6)
    assert m["specificity"] == pytest.approx(np.mean(spec), abs=1e-6)
    assert m["accuracy"] == pytest.approx((pred == t).mean(), abs=1e-6)
    assert m["auc"] == pytest.approx(roc_auc_score(t, p, average="macro"), abs=1e-6)


def test_auc_undefined_is_nan_not_zero():
    m = classification_metrics(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]), "binary")
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(0.5)


def test_probabilities_binary_two_logits_is_softmax_positive():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert probabilities(logits, "binary").tolist() == pytest.approx([0.5, 0.75])
    assert probabilities(torch.tensor([[0.0]]), "binary").tolist() == pytest.approx([0.5])


def test_roc_curve_points_and_auc():
    curves = roc_curves(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "binary",
                        class_names=["normal", "pneumonia"])
    c = curves["pneumonia"]
    assert c["auc"] == pytest.approx(0.75)
    assert c["fpr"][0] == 0 and c["tpr"][0] == 0 and c["fpr"][-1] == 1 and c["tpr"][-1] == 1
    # Trapezoid area under the returned points equals the AUC.
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(0.75)
    three = roc_curves(torch.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.05, torch.tensor([0, 1, 2, 1]), "multiclass")
    assert set(three) == {"0", "1", "2"}


def test_bootstrap_reproducible_and_brackets_point_estimate():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 2, 300)
    p = np.clip(0.35 * t + 0.65 * rng.random(300), 0, 1)
    a = bootstrap_ci(p, t, "binary", n_boot=200, seed=3)
    b = bootstrap_ci(p, t, "binary", n_boot=200, seed=3)
    c = bootstrap_ci(p, t, "binary", n_boot=200, seed=4)
    assert a == b and a != c
    point = classification_metrics(p, t, "binary")
    for k, ci in a.items():
        assert ci["low"] <= point[k] <= ci["high"], k
        assert ci["n"] == 200
    # Naive reference: percentile interval of AUC over the same resamples (same generator stream).
    gen = torch.Generator().manual_seed(3)
    aucs = []
    for _ in range(200):
        idx = torch.randint(0, 300, (300,), generator=gen).numpy()
        aucs.append(roc_auc_score(t[idx], p[idx]))
    assert a["auc"]["low"] == pytest.approx(np.percentile(aucs, 2.5), abs=1e-5)
    assert a["auc"]["high"] == pytest.approx(np.percentile(aucs, 97.5), abs=1e-5)


def test_aggregate_mean_std_over_seeds():
    agg = aggregate([{"auc": 0.8, "f1": 0.5}, {"auc": 0.9, "f1": 0.7}, {"auc": 1.0, "f1": float("nan")}])
    assert agg["auc"]["mean"] == pytest.approx(0.9)
    assert agg["auc"]["std"] == pytest.approx(0.1)  # sample std of 0.8, 0.9, 1.0
    assert agg["f1"]["n"] == 2 and agg["f1"]["mean"] == pytest.approx(0.6)
    assert math.isnan(aggregate([{"auc": 0.7}])["auc"]["std"])


def test_epochs_to_95_exact():
    assert epochs_to_fraction_of_best([0.5, 0.8, 0.9, 0.95, 1.0, 0.99]) == 4
    assert epochs_to_fraction_of_best([0.9, 0.6]) == 1
    assert epochs_to_fraction_of_best([float("nan"), 0.5, 0.6]) == 3
    assert epochs_to_fraction_of_best([]) is None


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="multiclass metrics need"):
        classification_metrics(torch.rand(4), torch.tensor([0, 1, 2, 0]), "multiclass")
    with pytest.raises(ValueError, match="unknown classification task"):
        classification_metrics(torch.rand(4), torch.tensor([0, 1, 1, 0]), "segmentation")
