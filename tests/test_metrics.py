"""Metrics against hand-computed values and a naive reference (sklearn, written-out loops)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc, binary_roc

from medpretrain.metrics import (
    METRICS,
    SEG_METRICS,
    aggregate,
    bootstrap_ci,
    bootstrap_images,
    classification_metrics,
    dice_threshold,
    epochs_to_fraction_of_best,
    mean_metrics,
    metric_names,
    operating_threshold,
    parse_threshold_rule,
    per_image_metrics,
    probabilities,
    roc_curves,
    segmentation_metrics,
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


# Mutation-testing gaps (benchmarks/results/mutation.md): each test below kills mutants that survived.


def _naive_auc(score, y) -> float:
    """Mann-Whitney AUC: the fraction of (positive, negative) pairs ordered right, ties counting 1/2."""
    score, y = np.asarray(score, float), np.asarray(y)
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"^binary metrics need probs \[N\] and target \[N\], got \(4, 1\) and "
                                         r"\(4, 1\)$"):
        classification_metrics(torch.rand(4, 1), torch.zeros(4, 1), "binary")
    with pytest.raises(ValueError, match=r"^multiclass metrics need probs \[N, C\] and target \[N\], got \(4, 3\) "
                                         r"and \(5,\)$"):
        classification_metrics(torch.rand(4, 3), torch.tensor([0, 1, 2, 0, 1]), "multiclass")
    with pytest.raises(ValueError, match=r"^multilabel metrics need probs \[N, K\] and target \[N, K\], got \(4,\) "
                                         r"and \(4,\)$"):
        classification_metrics(torch.rand(4), torch.tensor([0, 1, 1, 0]), "multilabel")
    with pytest.raises(ValueError, match=r"^unknown classification task 'segmentation'; expected binary, multiclass "
                                         r"or multilabel$"):
        classification_metrics(torch.rand(4), torch.tensor([0, 1, 1, 0]), "segmentation")


def test_probabilities_per_task():
    one_logit = torch.tensor([[0.0], [math.log(3.0)], [-math.log(3.0)]])
    assert probabilities(one_logit, "binary").tolist() == pytest.approx([0.5, 0.75, 0.25])
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]])
    assert probabilities(logits, "multiclass").tolist() == [pytest.approx([1 / 8, 2 / 8, 5 / 8]),
                                                            pytest.approx([1 / 3, 1 / 3, 1 / 3])]
    assert probabilities(logits, "multilabel").tolist() == [pytest.approx([0.5, 2 / 3, 5 / 6]),
                                                            pytest.approx([1 / (1 + math.exp(-1))] * 3)]
    with pytest.raises(ValueError, match=r"^unknown classification task 'regression'$"):
        probabilities(logits, "regression")


def test_binary_threshold_and_auc_with_one_positive_or_none():
    # At threshold 0.3 the predictions are 0 1 1 1 for labels 0 0 1 1: TP 2, FN 0, TN 1, FP 1.
    m = classification_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "binary",
                               threshold=0.3)
    assert m == pytest.approx({"auc": 0.75, "accuracy": 3 / 4, "sensitivity": 1.0, "specificity": 1 / 2,
                               "precision": 2 / 3, "f1": 2 * (2 / 3) / (2 / 3 + 1)})
    low = classification_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), "binary",
                                 threshold=0.05)  # everything predicted positive
    assert low["accuracy"] == pytest.approx(1 / 2) and low["specificity"] == 0.0
    # Exactly one positive: AUC is defined (2 of the 3 negatives score below it).
    one = classification_metrics(torch.tensor([0.2, 0.6, 0.4, 0.5]), torch.tensor([0, 0, 0, 1]), "binary")
    assert one["auc"] == pytest.approx(2 / 3)
    assert math.isnan(classification_metrics(torch.tensor([0.2, 0.9]), torch.tensor([0, 0]), "binary")["auc"])


def test_multiclass_accuracy_is_micro_and_auc_needs_every_class():
    # Arg-max predicts class 0 everywhere: accuracy (micro) 3/4, macro recall (1 + 0) / 2.
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    m = classification_metrics(p, torch.tensor([0, 0, 0, 1]), "multiclass")
    assert m["accuracy"] == pytest.approx(0.75) and m["sensitivity"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(1.0)  # the one class-1 case has the highest class-1 score
    three = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1]])
    absent = classification_metrics(three, torch.tensor([0, 1, 0, 1]), "multiclass")  # class 2 never occurs
    assert math.isnan(absent["auc"]) and absent["accuracy"] == pytest.approx(1.0)
    # Class 2 with a single case is present: macro one-vs-rest AUC against sklearn.
    t = torch.tensor([0, 1, 0, 2])
    assert classification_metrics(three, t, "multiclass")["auc"] == pytest.approx(
        roc_auc_score(t.numpy(), three.numpy(), multi_class="ovr", average="macro"))


def test_multilabel_precision_f1_threshold_and_undefined_auc():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, size=(40, 3))
    p = np.clip(t * 0.3 + rng.random((40, 3)) * 0.7, 0, 1)
    for thr in (0.5, 0.3):
        m = classification_metrics(p, t, "multilabel", threshold=thr)
        pred = p >= thr
        tp = ((pred == 1) & (t == 1)).sum(0)
        prec = tp / pred.sum(0)
        rec = tp / t.sum(0)
        assert m["precision"] == pytest.approx(np.mean(prec), abs=1e-6), thr
        assert m["f1"] == pytest.approx(np.mean(2 * prec * rec / (prec + rec)), abs=1e-6), thr
        assert m["accuracy"] == pytest.approx((pred == t).mean(), abs=1e-6), thr
    p4 = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.3, 0.6], [0.2, 0.4]])
    one_pos = torch.tensor([[1, 1], [0, 1], [0, 0], [0, 1]])  # label 0 has a single positive
    assert classification_metrics(p4, one_pos, "multilabel")["auc"] == pytest.approx(
        (1.0 + _naive_auc(p4[:, 1], one_pos[:, 1])) / 2)
    for col in ([0, 0, 0, 0], [1, 1, 1, 1]):  # a label without negatives or without positives
        t_bad = torch.stack([torch.tensor(col), torch.tensor([1, 0, 1, 0])], 1)
        assert math.isnan(classification_metrics(p4, t_bad, "multilabel")["auc"]), col


def test_roc_curve_names_and_skipped_classes():
    p, t = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.6]), torch.tensor([0, 0, 1, 1, 0])
    assert set(roc_curves(p, t, "binary")) == {"positive"}
    assert set(roc_curves(p, t, "binary", class_names=["only"])) == {"positive"}
    c = roc_curves(p, t, "binary", class_names=["normal", "pneumonia"])["pneumonia"]
    # Rounded to 5 decimals: FPR steps of 1/3 (three negatives).
    # Scores in descending order 0.8 (pos) 0.6 0.4 (neg) 0.35 (pos) 0.1 (neg).
    assert c["fpr"] == [0.0, 0.0, 0.33333, 0.66667, 0.66667, 1.0]
    assert c["tpr"] == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert c["auc"] == pytest.approx(_naive_auc(p, t))
    three = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1]])
    named = roc_curves(three, torch.tensor([0, 1, 0, 1]), "multiclass", class_names=["a", "b", "c"])
    assert set(named) == {"a", "b"}  # class c never occurs: no curve
    assert set(roc_curves(three, torch.tensor([0, 1, 0, 1]), "multiclass", class_names=["a", "b"])) == {"0", "1"}
    # Multi-label: an all-negative label, then an all-positive one, then a valid one.
    ml = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]])
    curves = roc_curves(three, ml, "multilabel")
    assert set(curves) == {"2"}
    assert curves["2"]["auc"] == pytest.approx(_naive_auc(three[:, 2], ml[:, 2]))


def test_roc_curve_thinning_keeps_evenly_spaced_points_and_both_ends():
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(600, generator=g) < 0.4).long()
    p = torch.rand(600, generator=g) * 0.6 + 0.4 * t
    full_fpr, full_tpr, _ = binary_roc(p, t)
    n = len(full_fpr)
    assert n > 300
    for max_points, kw in ((200, {}), (50, {"max_points": 50})):
        c = roc_curves(p, t, "binary", **kw)["positive"]
        idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
        assert len(c["fpr"]) == len(c["tpr"]) == max_points
        assert c["fpr"] == [round(float(full_fpr[i]), 5) for i in idx]
        assert c["tpr"] == [round(float(full_tpr[i]), 5) for i in idx]
        assert c["fpr"][0] == c["tpr"][0] == 0.0 and c["fpr"][-1] == c["tpr"][-1] == 1.0
    small = roc_curves(p[:20], t[:20], "binary", max_points=len(binary_roc(p[:20], t[:20])[0]))["positive"]
    assert len(small["fpr"]) == len(binary_roc(p[:20], t[:20])[0])  # at the limit nothing is dropped


def _mean_of_targets(pp, tt):
    return {"m": float(tt.float().mean())}


def test_bootstrap_defaults_validation_and_threshold():
    t = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    p = torch.full((8,), 0.4)
    default = bootstrap_ci(p, t, "binary", metric_fn=_mean_of_targets)
    assert default["m"]["n"] == 1000
    assert default == bootstrap_ci(p, t, "binary", metric_fn=_mean_of_targets, seed=0, n_boot=1000, alpha=0.05)
    assert bootstrap_ci(p, t, "binary", metric_fn=_mean_of_targets, n_boot=1)["m"]["n"] == 1
    for kw in ({"n_boot": 0}, {"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 1.5}):
        with pytest.raises(ValueError, match=r"^bootstrap needs n_boot >= 1 and 0 < alpha < 1, got "
                                             rf"{kw.get('n_boot', 1000)}, {kw.get('alpha', 0.05)}$"):
            bootstrap_ci(p, t, "binary", **kw)
    # Every probability is 0.4: at threshold 0.3 every resample predicts all positive, at 0.5 none.
    low = bootstrap_ci(p, t, "binary", n_boot=20, threshold=0.3)
    assert low["sensitivity"] == {"low": 1.0, "high": 1.0, "n": 20}
    assert bootstrap_ci(p, t, "binary", n_boot=20)["sensitivity"] == {"low": 0.0, "high": 0.0, "n": 20}


def test_bootstrap_undefined_metrics():
    calls = []

    def fn(pp, tt):
        calls.append(1)
        return {"never": math.nan, "once": 0.25 if len(calls) == 1 else math.nan, "always": 0.5}

    ci = bootstrap_ci(torch.rand(6), torch.tensor([0, 1, 0, 1, 0, 1]), "binary", n_boot=10, metric_fn=fn)
    assert math.isnan(ci["never"]["low"]) and math.isnan(ci["never"]["high"]) and ci["never"]["n"] == 0
    assert set(ci["never"]) == {"low", "high", "n"}
    assert ci["once"] == {"low": 0.25, "high": 0.25, "n": 1}
    assert ci["always"] == {"low": 0.5, "high": 0.5, "n": 10}


def test_aggregate_keys_and_missing_metrics():
    runs = [{"auc": 0.8, "f1": 0.5}, {"auc": 0.9, "f1": 0.7}, {"auc": 1.0}, {"auc": 0.7, "f1": None}]
    agg = aggregate(runs)
    assert agg["f1"]["n"] == 2 and agg["f1"]["std"] == pytest.approx(float(np.std([0.5, 0.7], ddof=1)))
    assert agg["auc"]["n"] == 4 and agg["auc"]["mean"] == pytest.approx(0.85)
    only = aggregate(runs, keys=["f1", "loss"])
    assert list(only) == ["f1", "loss"]
    assert only["loss"]["n"] == 0 and math.isnan(only["loss"]["mean"]) and math.isnan(only["loss"]["std"])


def test_epochs_to_fraction_edge_cases():
    assert epochs_to_fraction_of_best([0.7]) == 1
    assert epochs_to_fraction_of_best([float("nan"), float("nan")]) is None
    assert epochs_to_fraction_of_best([float("nan"), 0.0]) == 2  # a NaN epoch never reaches the target
    assert epochs_to_fraction_of_best([0.5, 0.6, 1.0], fraction=0.5) == 1


# Segmentation metrics

# A 2x3 image: targets 1 1 1 / 0 0 0; at 0.5 the predictions are 1 1 0 / 1 0 1: TP 2, FN 1, FP 2, TN 1.
SEG_P = torch.tensor([[0.9, 0.55, 0.2], [0.7, 0.1, 0.6]])
SEG_T = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_metric_names():
    assert metric_names("segmentation") == SEG_METRICS == ("dice", "jaccard", "sensitivity", "specificity", "auc")
    assert metric_names("binary") == metric_names("multilabel") == METRICS
    assert METRICS == ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def test_segmentation_metrics_hand_computed():
    m = segmentation_metrics(SEG_P, SEG_T)
    assert m == pytest.approx({"dice": 4 / 7, "jaccard": 2 / 5, "sensitivity": 2 / 3, "specificity": 1 / 3,
                               "auc": 5 / 9})
    assert list(m) == list(SEG_METRICS)
    # numpy inputs, soft targets binarised at 0.5, threshold 0.65: predictions 1 0 0 / 1 0 0: TP 1, FP 1, FN 2.
    soft = segmentation_metrics(SEG_P.numpy(), (SEG_T * 0.8 + 0.1).numpy(), threshold=0.65)
    assert soft == pytest.approx({"dice": 2 / 5, "jaccard": 1 / 4, "sensitivity": 1 / 3, "specificity": 2 / 3,
                                  "auc": 5 / 9})


def test_segmentation_metrics_roi_and_shape_errors():
    roi = torch.tensor([[1, 1, 0], [0, 1, 1]])  # keeps 0.9 (T), 0.55 (T), 0.1 (F), 0.6 (F): TP 2, FP 1, TN 1
    m = segmentation_metrics(SEG_P, SEG_T, roi)
    assert m == pytest.approx({"dice": 4 / 5, "jaccard": 2 / 3, "sensitivity": 1.0, "specificity": 1 / 2,
                               "auc": 3 / 4})
    assert segmentation_metrics(SEG_P, SEG_T, roi.float() * 0.6)["dice"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match=r"^probs \(2, 3\) and target \(3, 2\) differ in shape$"):
        segmentation_metrics(SEG_P, SEG_T.T)
    with pytest.raises(ValueError, match=r"^roi \(3,\) and probs \(2, 3\) differ in shape$"):
        segmentation_metrics(SEG_P, SEG_T, roi[0])


def test_segmentation_metrics_undefined_cases():
    z = torch.zeros(2, 3)
    empty = segmentation_metrics(z, z)  # nothing predicted, nothing there
    assert empty["dice"] == 1.0 and empty["jaccard"] == 1.0 and empty["specificity"] == 1.0
    assert math.isnan(empty["sensitivity"]) and math.isnan(empty["auc"])
    full = segmentation_metrics(torch.ones(2, 3), torch.ones(2, 3))  # no negatives
    assert full["dice"] == 1.0 and full["sensitivity"] == 1.0
    assert math.isnan(full["specificity"]) and math.isnan(full["auc"])
    missed = segmentation_metrics(z, SEG_T)  # vessels there, none predicted
    assert missed["dice"] == 0.0 and missed["jaccard"] == 0.0 and missed["sensitivity"] == 0.0


def test_segmentation_auc_subsample_is_seeded():
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(30, generator=g) < 0.4).float()
    p = torch.rand(30, generator=g) * 0.7 + 0.3 * t
    assert segmentation_metrics(p, t)["auc"] == pytest.approx(_naive_auc(p, t), abs=1e-6)
    assert segmentation_metrics(p, t, auc_max_pixels=30)["auc"] == pytest.approx(_naive_auc(p, t), abs=1e-6)
    for seed in (0, 3):
        idx = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:12]
        got = segmentation_metrics(p, t, auc_max_pixels=12, seed=seed)["auc"]
        assert got == pytest.approx(_naive_auc(p[idx], t[idx]), abs=1e-6), seed
    assert segmentation_metrics(p, t, auc_max_pixels=12)["auc"] == pytest.approx(
        segmentation_metrics(p, t, auc_max_pixels=12, seed=0)["auc"])
    one = torch.tensor([0.2, 0.9, 0.4, 0.95])  # a single foreground pixel: AUC is defined
    assert segmentation_metrics(one, torch.tensor([0, 1, 0, 0]))["auc"] == pytest.approx(2 / 3)


def test_segmentation_auc_subsamples_above_200k_pixels_by_default():
    g = torch.Generator().manual_seed(1)
    n = 200_001  # one pixel over the default limit (a DRIVE image has 329,960)
    t = (torch.rand(n, generator=g) < 0.1).long()
    p = torch.rand(n, generator=g) * 0.8 + 0.2 * t
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:200_000]
    assert segmentation_metrics(p, t)["auc"] == float(binary_auroc(p[idx], t[idx]))
    assert segmentation_metrics(p, t)["auc"] != float(binary_auroc(p, t))


def test_per_image_and_mean_metrics():
    z = torch.zeros(2, 3)
    rows = per_image_metrics([SEG_P, z], [SEG_T, SEG_T])
    assert rows == [segmentation_metrics(SEG_P, SEG_T), segmentation_metrics(z, SEG_T)]
    roi = torch.tensor([[1, 1, 0], [0, 1, 1]])
    with_roi = per_image_metrics([SEG_P], [SEG_T], [roi], threshold=0.65)
    assert with_roi == [segmentation_metrics(SEG_P, SEG_T, roi, threshold=0.65)]
    with pytest.raises(ValueError):
        per_image_metrics([SEG_P, z], [SEG_T])
    nan = float("nan")
    table = [{"dice": 0.2, "jaccard": nan, "sensitivity": 0.5, "specificity": 0.9, "auc": 0.8},
             {"dice": 0.6, "jaccard": nan, "sensitivity": nan, "specificity": 0.7, "auc": 0.6}]
    mean = mean_metrics(table)
    assert list(mean) == list(SEG_METRICS)
    assert mean["dice"] == pytest.approx(0.4) and mean["sensitivity"] == pytest.approx(0.5)
    assert math.isnan(mean["jaccard"])
    assert mean_metrics(table, keys=["auc"]) == {"auc": pytest.approx(0.7)}


def test_bootstrap_images_against_loops():
    nan = float("nan")
    rows = [{"dice": d, "sensitivity": s, "jaccard": nan} for d, s in
            ((0.2, 0.5), (0.4, nan), (0.9, 0.7), (0.5, 0.1), (0.3, nan))]
    ci = bootstrap_images(rows, n_boot=300, seed=4, level=0.9, keys=["dice", "sensitivity", "jaccard"])
    idx = np.random.default_rng(4).integers(0, 5, size=(300, 5))
    for k in ("dice", "sensitivity"):
        means = []
        for draw in idx:
            vals = [rows[i][k] for i in draw if not math.isnan(rows[i][k])]
            if vals:
                means.append(sum(vals) / len(vals))
        assert ci[k]["low"] == pytest.approx(np.quantile(means, 0.05)), k
        assert ci[k]["high"] == pytest.approx(np.quantile(means, 0.95)), k
    assert math.isnan(ci["jaccard"]["low"]) and math.isnan(ci["jaccard"]["high"])
    g = torch.Generator().manual_seed(2)
    seg_rows = [segmentation_metrics(torch.rand(2, 3, generator=g), SEG_T) for _ in range(7)]
    default = bootstrap_images(seg_rows)
    assert set(default) == set(SEG_METRICS)
    assert default == bootstrap_images(seg_rows, n_boot=1000, seed=0, level=0.95)
    for kw in ({"n_boot": 1001}, {"seed": 1}):
        assert default != bootstrap_images(seg_rows, **kw), kw
    with pytest.raises(ValueError, match=r"^bootstrap_images needs at least one image$"):
        bootstrap_images([])


# Mutation-testing gaps of the validation thresholds (benchmarks/results/mutation.md, run at 22138fd): per-label
# multi-label thresholds and the threshold argument's defaults and errors.


def test_multilabel_per_label_thresholds_against_loops():
    # Probabilities in eighths (exact in float32); five of them sit exactly on their label's threshold, which
    # counts as positive (prob >= threshold).
    p = torch.tensor([[0.875, 0.25, 0.375], [0.5, 0.75, 0.625], [0.25, 0.375, 0.125], [0.625, 0.5, 0.75],
                      [0.125, 0.875, 0.25], [0.5, 0.125, 0.5], [0.375, 0.625, 0.875], [0.75, 0.25, 0.625]])
    t = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 0]])
    thr = [0.5, 0.375, 0.625]
    pred = p.numpy() >= np.array(thr, np.float32)
    y = t.numpy().astype(bool)
    assert int((p.numpy() == np.array(thr, np.float32)).sum()) == 5  # ties decide the > vs >= question
    tp, fp = (pred & y).sum(0), (pred & ~y).sum(0)
    tn, fn = (~pred & ~y).sum(0), (~pred & y).sum(0)
    rec, prec = tp / (tp + fn), tp / (tp + fp)
    want = {"auc": roc_auc_score(y, p.numpy(), average="macro"), "accuracy": (pred == y).mean(),
            "sensitivity": rec.mean(), "specificity": (tn / (tn + fp)).mean(), "precision": prec.mean(),
            "f1": (2 * prec * rec / (prec + rec)).mean()}
    m = classification_metrics(p, t, "multilabel", threshold=thr)
    assert m == pytest.approx(want, abs=1e-6)
    # AUC comes from the probabilities: the 0/1 decisions would give another value.
    assert classification_metrics(torch.from_numpy(pred).float(), t, "multilabel")["auc"] != pytest.approx(m["auc"])
    assert classification_metrics(p, t, "multilabel", threshold=tuple(thr)) == m
    with pytest.raises(ValueError, match=r"^multilabel metrics need one threshold per label \(3\), got \[0\.5, 0\.5\]$"):
        classification_metrics(p, t, "multilabel", threshold=[0.5, 0.5])


def test_threshold_none_means_half_and_binary_takes_one_number():
    p, t = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    default = classification_metrics(p, t, "binary", threshold=None)
    assert default == classification_metrics(p, t, "binary", threshold=0.5)
    assert default["sensitivity"] == pytest.approx(0.5)  # 0.8 only: not 0 (as at a threshold above 1)
    ml_p = torch.tensor([[0.55, 0.2], [0.7, 0.6], [0.1, 0.4]])
    ml_t = torch.tensor([[1, 0], [1, 1], [0, 0]])
    assert classification_metrics(ml_p, ml_t, "multilabel", threshold=None)["sensitivity"] == pytest.approx(1.0)
    for bad in ([0.5], (0.3, 0.7)):
        with pytest.raises(ValueError, match=rf"^binary metrics take one threshold, got {re.escape(repr(bad))}$"):
            classification_metrics(p, t, "binary", threshold=bad)


def test_a_score_equal_to_the_threshold_is_positive():
    from medpretrain.stats import youden_threshold

    val_p = np.array([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9], np.float32)
    val_y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    thr = youden_threshold(val_p, val_y)
    assert thr == 0.75  # J = 1: positive if score >= 0.75 separates validation perfectly
    m = classification_metrics(val_p, val_y, "binary", threshold=thr)
    ml = classification_metrics(np.stack([val_p, val_p], 1), np.stack([val_y, val_y], 1), "multilabel", threshold=thr)
    # The 0.75 case is positive for every path (it was negative through torchmetrics' prob > threshold).
    assert (m["sensitivity"], m["specificity"], ml["sensitivity"]) == (1.0, 1.0, 1.0)


# Mutation-testing gaps of the operating points chosen on validation (operating_threshold, dice_threshold), which
# tests/test_protocol.py brought into the mutated set's coverage. Scores and candidates in eighths are exact in
# float32 and float64, so a score equal to a candidate is the same number on both sides.

EIGHTHS = [k / 8 for k in range(1, 8)]


def test_operating_threshold_one_positive_one_class_and_per_label_rules():
    p = np.array([0.125, 0.25, 0.375, 0.5, 0.625, 0.75])
    # One positive is enough for Youden's J (here 1 + 4/5 - 1 at 0.625); no positive at all is not.
    assert operating_threshold(p, np.array([0, 0, 0, 0, 1, 0]), "binary") == (0.625, "youden on validation")
    assert operating_threshold(p, np.zeros(6, int), "binary") == (
        0.5, "youden undefined on validation (one class only): 0.5")
    # Per label, each with the rule's own value; the distinct rules in words, sorted and joined.
    y = np.stack([np.array([0, 0, 1, 0, 1, 1]), np.zeros(6, int)], 1)
    assert operating_threshold(np.stack([p, p], 1), y, "multilabel", "sensitivity:0.5") == (
        [0.625, 0.5], "sensitivity >= 0.5 on validation; sensitivity undefined on validation (one class only): 0.5 "
                      "(per label)")  # 0.625 calls 2 of the 3 positives
    assert operating_threshold(np.stack([p, p], 1), y, "multilabel", "0.3") == ([0.3, 0.3], "fixed 0.3 (per label)")



def test_parse_threshold_rule_bounds_spaces_and_messages():
    assert parse_threshold_rule(" youden ") == ("youden", None)
    assert parse_threshold_rule("0") == ("fixed", 0.0) and parse_threshold_rule(1) == ("fixed", 1.0)
    assert parse_threshold_rule("sensitivity:1") == ("sensitivity", 1.0)
    assert parse_threshold_rule(" specificity:0 ") == ("specificity", 0.0)
    forms = "youden, a number in [0, 1], sensitivity:<x> or specificity:<x>"
    for bad in ("yuden", "sensitivity:", "specificity:high", "sens:0.9", "youden:0.5"):
        with pytest.raises(ValueError, match=rf"^threshold rule {re.escape(repr(bad))}: expected {re.escape(forms)}$"):
            parse_threshold_rule(bad)
    for bad in ("1.5", "-0.1", "nan", "specificity:2", "sensitivity:-0.5"):
        with pytest.raises(ValueError, match=rf"^threshold rule {re.escape(repr(bad))}: the value must lie in \[0, 1\]$"):
            parse_threshold_rule(bad)

def _ref_dice_choice(dice, grid):
    """``dice[i][c]``: Dice of image i at candidate c; the best mean, ties to the candidate nearest 0.5, then lower."""
    mean = {c: round(float(np.mean([d[c] for d in dice])), 12) for c in grid}
    return min(grid, key=lambda c: (-mean[c], abs(c - 0.5), c))


def test_dice_threshold_against_segmentation_metrics():
    rng = np.random.default_rng(3)
    masks = [(rng.random((6, 7)) < 0.4).astype(np.float32) for _ in range(3)] + [np.zeros((6, 7), np.float32)]
    probs = [np.where(m > 0, rng.integers(2, 9, m.shape), rng.integers(0, 7, m.shape)).astype(np.float32) / 8
             for m in masks[:3]]
    # An empty mask with one stray pixel: one false positive and nothing else up to 0.625 (Dice 0), then an
    # empty prediction of an empty mask (Dice 1).
    probs.append(np.where(np.arange(42).reshape(6, 7) == 5, 0.625, 0.0).astype(np.float32))
    rois = [np.ones((6, 7), np.float32) for _ in masks]
    rois[0][:, :3] = 0  # scored inside the roi only
    rois[1][2:, :] = 0
    dice = [{c: segmentation_metrics(p, m, r, threshold=c)["dice"] for c in EIGHTHS}
            for p, m, r in zip(probs, masks, rois, strict=True)]
    assert [dice[3][c] for c in EIGHTHS] == [0.0] * 5 + [1.0] * 2
    # Every pair of candidates, on each image alone and on all four: the choice orders the whole mean-Dice curve.
    for idx in ([0], [1], [2], [3], [0, 1, 2, 3]):
        for a in range(len(EIGHTHS)):
            for b in range(a + 1, len(EIGHTHS)):
                grid = [EIGHTHS[a], EIGHTHS[b]]
                got = dice_threshold([probs[i] for i in idx], [masks[i] for i in idx], [rois[i] for i in idx], grid)
                assert got == _ref_dice_choice([dice[i] for i in idx], grid), (idx, grid)
    assert dice_threshold(probs, masks, rois, EIGHTHS) == _ref_dice_choice(dice, EIGHTHS)
    full = [np.ones((6, 7), np.float32)] * 4
    assert dice_threshold(probs, masks, None, EIGHTHS) == dice_threshold(probs, masks, full, EIGHTHS)
    assert dice_threshold(probs[:1], masks[:1], grid=[0.3]) == 0.3  # one image, one candidate
    with pytest.raises(ValueError, match=r"^dice_threshold needs at least one image and one candidate threshold$"):
        dice_threshold(probs, masks, grid=[])
    with pytest.raises(ValueError, match=r"^dice_threshold needs at least one image and one candidate threshold$"):
        dice_threshold([], [], grid=EIGHTHS)
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        dice_threshold(probs, masks[:3])  # a missing mask is an error, not an image left out


def test_dice_threshold_ties_nearest_half_then_lower_and_no_tolerance():
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 1:6] = 1
    clean = np.where(mask > 0, 0.875, 0.125).astype(np.float32)  # Dice 1 at every candidate in (0.125, 0.875]
    assert dice_threshold([clean], [mask], grid=EIGHTHS) == 0.5
    assert dice_threshold([clean], [mask], grid=[0.25, 0.375, 0.625, 0.75]) == 0.375  # as near 0.5 as 0.625
    assert dice_threshold([clean], [mask], grid=[0.875, 0.75, 0.125]) == 0.75  # the grid need not be sorted
    # A million foreground pixels, one of them at 0.4375: Dice 1 at 0.375, 1 - 5e-7 at 0.5. Only an exact tie
    # (within 1e-12) moves the choice towards 0.5.
    big = np.full((1000, 1000), 0.875, np.float32)
    big[0, 0] = 0.4375
    assert dice_threshold([big], [np.ones_like(big)], grid=[0.375, 0.5]) == 0.375


def test_dice_threshold_counts_as_segmentation_metrics_does_at_a_float32_tie():
    p, m = torch.tensor([[0.35, 0.35, 0.1, 0.1]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert [segmentation_metrics(p, m, threshold=c)["dice"] for c in (0.35, 0.4)] == [1.0, 0.0]
    assert dice_threshold([p], [m], grid=[0.35, 0.4]) == 0.35  # it was 0.4: float64 candidates missed the tie


def test_multiclass_ignores_a_threshold_list():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], np.float32)
    labels = np.array([0, 1, 2])
    assert classification_metrics(probs, labels, "multiclass", threshold=[0.9, 0.9, 0.9]) == \
        classification_metrics(probs, labels, "multiclass")


@pytest.mark.parametrize("n, threshold", [(624, 0.5), (9, 0.7)])
def test_binary_bootstrap_vectorised_equals_the_per_resample_metrics(n, threshold):
    """The vectorised binary bootstrap draws the same resamples and gives the same intervals (and the same
    count of resamples with a defined AUC) as scoring each resample with classification_metrics."""
    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    p = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 1).astype(np.float32)  # ties, some at threshold
    fast = bootstrap_ci(p, y, "binary", n_boot=300, seed=5, threshold=threshold)
    slow = bootstrap_ci(p, y, "binary", n_boot=300, seed=5, threshold=threshold,
                        metric_fn=lambda a, b: classification_metrics(a, b, "binary", threshold=threshold))
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k]["n"] == slow[k]["n"], k
        assert fast[k]["low"] == pytest.approx(slow[k]["low"], abs=1e-6), k
        assert fast[k]["high"] == pytest.approx(slow[k]["high"], abs=1e-6), k
    if n == 9:
        assert fast["auc"]["n"] < 300  # some resamples miss a class: their AUC is left out, as before


def test_binary_bootstrap_rows_equal_classification_metrics_with_empty_denominators():
    """Each resample's six metrics from the vectorised binary bootstrap equal classification_metrics on that
    resample, including resamples with no positive, no negative or no predicted positive, where a ratio with
    an empty denominator is 0 (torchmetrics' zero_division) and AUC is NaN."""
    from medpretrain.metrics import _binary_bootstrap_samples

    p = np.array([0.1, 0.4, 0.35, 0.8, 0.6], dtype=np.float32)
    t = np.array([0, 0, 1, 1, 0])
    idx = np.random.default_rng(3).integers(0, 5, (100, 5))
    idx[:4] = [[0, 1, 4, 0, 1], [2, 3, 2, 3, 3], [0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]  # no pos; no neg; no predicted pos
    got = _binary_bootstrap_samples(p.astype(np.float64), t, idx, p >= 0.5)
    assert sorted(got) == sorted(METRICS)
    empty = {"sensitivity": 0, "precision": 0, "f1": 0, "specificity": 0}
    for i, row in enumerate(idx):
        ref = classification_metrics(p[row], t[row], "binary")
        for k in METRICS:
            if math.isnan(ref[k]):
                assert math.isnan(got[k][i]), (i, k)
            else:
                assert got[k][i] == pytest.approx(ref[k], abs=1e-6), (i, k)
        y, d = t[row] > 0, p[row] >= 0.5
        empty["sensitivity"] += not y.any()
        empty["specificity"] += y.all()
        empty["precision"] += not d.any()
        empty["f1"] += not (y.any() or d.any())
    assert all(v > 0 for v in empty.values()), empty  # every empty denominator occurs
    assert got["sensitivity"][0] == got["precision"][0] == got["f1"][0] == 0.0 and math.isnan(got["auc"][0])
    assert got["specificity"][1] == 0.0 and got["accuracy"][3] == 1.0


def test_multilabel_accuracy_is_the_element_wise_fraction():
    """Multi-label accuracy counts every (case, label) decision once: 5 of 6 right here, as one division (the
    mean of the per-label accuracies 2/3 and 1 is the same number but rounds differently in float32)."""
    p = torch.tensor([[0.9, 0.2], [0.6, 0.8], [0.7, 0.1]])
    t = torch.tensor([[1, 0], [0, 1], [1, 0]])
    m = classification_metrics(p, t, "multilabel")
    assert m["accuracy"] == float(torch.tensor(5.0) / 6.0)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5  # label 0: the negative case is predicted positive


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_bootstrap_multiclass_and_multilabel_against_a_loop(task):
    """Without metric_fn a multi-class or multi-label resample is scored by classification_metrics at the given
    threshold: the intervals and counts equal a written-out loop over the same draws (one randint per resample)."""
    rng = np.random.default_rng(11)
    n = 30
    if task == "multiclass":
        p = rng.random((n, 3))
        p /= p.sum(1, keepdims=True)
        y = rng.integers(0, 3, n)
    else:
        p = np.round(rng.random((n, 2)), 1)
        y = (rng.random((n, 2)) < 0.3).astype(np.int64)
    p = p.astype(np.float32)
    ci = bootstrap_ci(p, y, task, n_boot=30, seed=2, threshold=0.3, alpha=0.1)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(30):
        i = torch.randint(0, n, (n,), generator=gen).numpy()
        rows.append(classification_metrics(p[i], y[i], task, threshold=0.3))
    assert sorted(ci) == sorted(METRICS)
    for k in METRICS:
        v = np.array([r[k] for r in rows])
        v = v[np.isfinite(v)]
        assert ci[k] == {"low": float(np.percentile(v, 5)), "high": float(np.percentile(v, 95)), "n": len(v)}, k
    if task == "multilabel":  # the threshold reaches the resamples: at 0.5 the intervals differ
        assert bootstrap_ci(p, y, task, n_boot=30, seed=2, alpha=0.1)["sensitivity"] != ci["sensitivity"]


def test_binary_bootstrap_default_never_scores_resamples_one_by_one(monkeypatch):
    """The binary default is the vectorised path: no classification_metrics call per resample (1000 of them per
    test set otherwise), with the intervals of that path."""
    import medpretrain.metrics as metrics_module

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    p = np.clip(0.4 * y + 0.6 * rng.random(40), 0, 1).astype(np.float32)
    want = bootstrap_ci(p, y, "binary", n_boot=50, seed=1, threshold=0.4)

    def per_resample(*args, **kwargs):
        raise AssertionError("bootstrap_ci scored a binary resample with classification_metrics")

    monkeypatch.setattr(metrics_module, "classification_metrics", per_resample)
    assert bootstrap_ci(p, y, "binary", n_boot=50, seed=1, threshold=0.4) == want
    assert want["auc"]["n"] == 50 and 0.5 < want["auc"]["low"] < want["auc"]["high"] < 1.0
