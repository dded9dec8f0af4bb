"""Classification metrics through torchmetrics, with bootstrap intervals and seed aggregation.

Every function takes *probabilities* (not logits) and integer / {0, 1} targets:

* ``binary``: ``probs [N]`` (probability of the positive class), ``target [N]`` in {0, 1};
* ``multiclass``: ``probs [N, C]`` (rows sum to 1), ``target [N]`` in ``0..C-1``;
* ``multilabel``: ``probs [N, K]`` (independent sigmoids), ``target [N, K]`` in {0, 1}.

The six reported metrics (:data:`METRICS`) are AUC (ROC AUC; macro one-vs-rest for multi-class, macro
over labels for multi-label), accuracy (fraction of correct predictions; element-wise for multi-label),
sensitivity (= recall), specificity, precision and F1, the last four macro-averaged over classes /
labels when there are more than two. Binary and multi-label predictions threshold at ``threshold`` (one
per label for multi-label, if given as a list); multi-class predictions take the arg-max.
:func:`operating_threshold` chooses that threshold on validation (Youden's J, a target sensitivity or
specificity, or a fixed value: :func:`parse_threshold_rule`) to be applied to test.

Binary segmentation metrics (:data:`SEG_METRICS`, :func:`segmentation_metrics`) take probability maps,
binary targets and an optional region of interest (DRIVE scores inside the field of view): Dice, Jaccard,
sensitivity, specificity, pixel AUC; :func:`per_image_metrics`, :func:`mean_metrics` and
:func:`bootstrap_images` score a test set image by image; :func:`dice_threshold` picks the binarisation
threshold that maximises the mean per-image Dice (on validation images). :func:`metric_names` gives a
task's metrics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional import classification as C
from torchmetrics.functional.classification import binary_auroc

Task = Literal["binary", "multiclass", "multilabel"]
METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
SEG_METRICS: tuple[str, ...] = ("dice", "jaccard", "sensitivity", "specificity", "auc")
METRIC_LABELS: dict[str, str] = {"auc": "AUC", "accuracy": "ACC", "sensitivity": "Sens", "specificity": "Spec",
                                 "precision": "Prec", "f1": "F1", "dice": "Dice", "jaccard": "Jaccard"}
"""Short names of the metrics in tables, plots and log lines."""


def metric_names(task: str) -> tuple[str, ...]:
    """The reported metrics of a task: :data:`SEG_METRICS` for ``segmentation``, else :data:`METRICS`."""
    return SEG_METRICS if task == "segmentation" else METRICS


def _as_tensors(probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probs).detach().float().cpu()
    t = torch.as_tensor(target).detach().cpu().long()
    return p, t


def _check(p: torch.Tensor, t: torch.Tensor, task: str) -> int:
    """Validate shapes and return the number of classes / labels (2 for binary)."""
    if task == "binary":
        if p.ndim != 1 or t.shape != p.shape:
            raise ValueError(f"binary metrics need probs [N] and target [N], got {tuple(p.shape)} and {tuple(t.shape)}")
        return 2
    if task == "multiclass":
        if p.ndim != 2 or t.ndim != 1 or t.shape[0] != p.shape[0]:
            raise ValueError(f"multiclass metrics need probs [N, C] and target [N], got {tuple(p.shape)} and {tuple(t.shape)}")
        return int(p.shape[1])
    if task == "multilabel":
        if p.ndim != 2 or t.shape != p.shape:
            raise ValueError(f"multilabel metrics need probs [N, K] and target [N, K], got {tuple(p.shape)} and {tuple(t.shape)}")
        return int(p.shape[1])
    raise ValueError(f"unknown classification task {task!r}; expected binary, multiclass or multilabel")


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Map head outputs to the probabilities the metrics take.

    Binary heads may have one logit (sigmoid) or two (softmax, the MedMNIST convention; the positive
    class is index 1). Multi-class: softmax. Multi-label: sigmoid per label.
    """
    if task == "binary":
        if logits.ndim == 2 and logits.shape[1] == 2:
            return logits.softmax(dim=1)[:, 1]
        return torch.sigmoid(logits.reshape(-1))
    if task == "multiclass":
        return logits.softmax(dim=1)
    if task == "multilabel":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown classification task {task!r}")


def classification_metrics(
    probs: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    task: str,
    *,
    threshold: float | Sequence[float] | None = 0.5,
) -> dict[str, float]:
    """The six :data:`METRICS` for one set of predictions (floats; AUC is NaN if a class is absent).

    ``threshold``: positive if ``prob >= threshold`` (binary; multi-label: one number for every label or one
    per label); ignored for multi-class (arg-max). ``None`` means 0.5.
    """
    p, t = _as_tensors(probs, target)
    n = _check(p, t, task)
    if threshold is None:
        threshold = 0.5
    kw: dict[str, Any]
    out: dict[str, Any]  # tensors from torchmetrics, floats once returned
    if task == "binary" and not isinstance(threshold, (int, float)):
        raise ValueError(f"binary metrics take one threshold, got {threshold!r}")
    if task == "multilabel" and not isinstance(threshold, (int, float)):
        per_label = torch.as_tensor([float(v) for v in threshold])
        if per_label.shape != (n,):
            raise ValueError(f"multilabel metrics need one threshold per label ({n}), got {list(threshold)}")
        # Decisions per label, then torchmetrics on the 0/1 decisions (>= 0.5 keeps them as they are);
        # AUC still takes the probabilities.
        decided = (p >= per_label[None, :]).float()
        out = classification_metrics(decided, t, task, threshold=0.5)
        out["auc"] = classification_metrics(p, t, task)["auc"]
        return out
    if task == "multiclass":
        threshold = 0.5  # ignored: the arg-max decides (a list given here is not an error)
    threshold = float(threshold)  # type: ignore[arg-type]
    # The decisions are made here, positive if prob >= threshold (as youden_threshold / threshold_for choose
    # the threshold); torchmetrics, which calls prob > threshold positive, then scores the 0/1 decisions.
    decided = (p >= threshold).to(p.dtype)
    if task == "binary":
        kw = {"threshold": 0.5}
        out = {
            "auc": C.binary_auroc(p, t) if 0 < int(t.sum()) < len(t) else torch.tensor(math.nan),
            "accuracy": C.binary_accuracy(decided, t, **kw),
            "sensitivity": C.binary_recall(decided, t, **kw),
            "specificity": C.binary_specificity(decided, t, **kw),
            "precision": C.binary_precision(decided, t, **kw),
            "f1": C.binary_f1_score(decided, t, **kw),
        }
    elif task == "multiclass":
        present = torch.bincount(t, minlength=n) > 0
        kw = {"num_classes": n, "average": "macro"}
        out = {
            "auc": C.multiclass_auroc(p, t, **kw) if bool(present.all()) else torch.tensor(math.nan),
            "accuracy": C.multiclass_accuracy(p, t, num_classes=n, average="micro"),
            "sensitivity": C.multiclass_recall(p, t, **kw),
            "specificity": C.multiclass_specificity(p, t, **kw),
            "precision": C.multiclass_precision(p, t, **kw),
            "f1": C.multiclass_f1_score(p, t, **kw),
        }
    else:
        pos = t.sum(0)
        defined = bool(((pos > 0) & (pos < len(t))).all())
        kw = {"num_labels": n, "average": "macro", "threshold": 0.5}
        out = {
            "auc": C.multilabel_auroc(p, t, num_labels=n, average="macro") if defined else torch.tensor(math.nan),
            "accuracy": C.multilabel_accuracy(decided, t, num_labels=n, average="micro", threshold=0.5),
            "sensitivity": C.multilabel_recall(decided, t, **kw),
            "specificity": C.multilabel_specificity(decided, t, **kw),
            "precision": C.multilabel_precision(decided, t, **kw),
            "f1": C.multilabel_f1_score(decided, t, **kw),
        }
    return {k: float(v) for k, v in out.items()}


def parse_threshold_rule(rule: str | float) -> tuple[str, float | None]:
    """``eval.threshold`` -> ``(kind, value)``: ``youden`` -> ``("youden", None)``; ``sensitivity:<x>`` /
    ``specificity:<x>`` (``x`` in [0, 1]) -> ``("sensitivity" | "specificity", x)``; a number in [0, 1] ->
    ``("fixed", x)``. Raises ``ValueError`` naming the accepted forms."""
    text = str(rule).strip()
    forms = "youden, a number in [0, 1], sensitivity:<x> or specificity:<x>"
    if text == "youden":
        return "youden", None
    kind, sep, value = text.partition(":")
    try:
        x = float(value if sep else kind)
    except ValueError:
        raise ValueError(f"threshold rule {text!r}: expected {forms}") from None
    if sep and kind not in ("sensitivity", "specificity"):
        raise ValueError(f"threshold rule {text!r}: expected {forms}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"threshold rule {text!r}: the value must lie in [0, 1]")
    return (kind if sep else "fixed"), x


def _binary_threshold(p: np.ndarray, y: np.ndarray, kind: str, value: float | None) -> tuple[float, str]:
    from medpretrain.stats import threshold_for, youden_threshold

    if kind == "fixed":
        return float(value), f"fixed {value:g}"  # type: ignore[arg-type]
    if not 0 < int(y.sum()) < len(y):
        return 0.5, f"{kind} undefined on validation (one class only): 0.5"
    if kind == "youden":
        return youden_threshold(p, y), "youden on validation"
    t = threshold_for(p, y, **{kind: value})
    return t, f"{kind} >= {value:g} on validation"


def operating_threshold(probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, task: str,
                        rule: str | float = "youden") -> tuple[float | list[float] | None, str]:
    """The decision threshold chosen on these (validation) predictions by ``rule`` (:func:`parse_threshold_rule`),
    to be applied unchanged to test: ``(threshold, rule in words)``.

    Binary: one threshold (:func:`medpretrain.stats.youden_threshold` / :func:`~medpretrain.stats.threshold_for`;
    0.5 when validation has one class only). Multi-label: one per label, each chosen on its own column.
    Multi-class: ``(None, "argmax")`` (the arg-max takes no threshold).
    """
    kind, value = parse_threshold_rule(rule)
    p, t = _as_tensors(probs, target)
    _check(p, t, task)
    if task == "multiclass":
        return None, "argmax"
    if task == "binary":
        return _binary_threshold(p.numpy(), t.numpy(), kind, value)
    chosen = [_binary_threshold(p[:, k].numpy(), t[:, k].numpy(), kind, value) for k in range(p.shape[1])]
    rules = sorted({r for _, r in chosen})
    return [thr for thr, _ in chosen], "; ".join(rules) + " (per label)"


def roc_curves(
    probs: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    task: str,
    *,
    class_names: Sequence[str] | None = None,
    max_points: int = 200,
) -> dict[str, dict[str, Any]]:
    """ROC points per curve: ``{name: {"fpr": [...], "tpr": [...], "auc": float}}``.

    Binary: one curve (the positive class). Multi-class: one-vs-rest per class. Multi-label: per label.
    Curves are thinned to at most ``max_points`` points (first and last kept) to keep results small.
    """
    p, t = _as_tensors(probs, target)
    n = _check(p, t, task)
    if task == "binary":
        pairs = [((class_names[1] if class_names and len(class_names) > 1 else "positive"), p, t)]
    else:
        onehot = torch.nn.functional.one_hot(t, n) if task == "multiclass" else t
        names = list(class_names) if class_names and len(class_names) == n else [str(i) for i in range(n)]
        pairs = [(names[i], p[:, i], onehot[:, i]) for i in range(n)]
    curves: dict[str, dict[str, Any]] = {}
    for name, score, y in pairs:
        if not 0 < int(y.sum()) < len(y):
            continue  # ROC undefined without both positives and negatives
        fpr, tpr, _ = C.binary_roc(score, y)
        if len(fpr) > max_points:
            idx = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
            fpr, tpr = fpr[idx], tpr[idx]
        curves[name] = {
            "fpr": [round(float(v), 5) for v in fpr],
            "tpr": [round(float(v), 5) for v in tpr],
            "auc": float(C.binary_auroc(score, y)),
        }
    return curves


def bootstrap_ci(
    probs: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    task: str,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float | Sequence[float] = 0.5,
    metric_fn: Callable[..., Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap confidence intervals for every metric on one test set.

    Resamples the test cases with replacement ``n_boot`` times (seeded, so the interval is
    reproducible) and returns ``{metric: {"low", "high", "n"}}`` at level ``1 - alpha``, where ``n``
    counts the resamples on which the metric was defined (a resample without one of the classes has
    no AUC and is left out of that metric only).
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap needs n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    p, t = _as_tensors(probs, target)
    _check(p, t, task)
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, Any]
    if metric_fn is None and task == "binary" and p.ndim == 1:
        if not isinstance(threshold, (int, float)):
            raise ValueError(f"binary metrics take one threshold, got {threshold!r}")
        # All resamples at once (the same draws as one randint per resample), counted with numpy.
        idx = torch.randint(0, len(t), (n_boot, len(t)), generator=gen).numpy()
        samples = _binary_bootstrap_samples(p.double().numpy(), t.numpy(), idx, (p >= float(threshold)).numpy())
    else:
        fn = metric_fn or (lambda pp, tt: classification_metrics(pp, tt, task, threshold=threshold))
        samples = {}
        for _ in range(n_boot):
            idx_t = torch.randint(0, len(t), (len(t),), generator=gen)
            for k, v in fn(p[idx_t], t[idx_t]).items():
                samples.setdefault(k, []).append(v)
    out = {}
    for k, vals in samples.items():
        arr = np.asarray(vals, dtype=float)
        arr = arr[np.isfinite(arr)]
        if len(arr) == 0:
            out[k] = {"low": math.nan, "high": math.nan, "n": 0}
            continue
        lo, hi = np.percentile(arr, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = {"low": float(lo), "high": float(hi), "n": int(len(arr))}
    return out


def _binary_bootstrap_samples(p: np.ndarray, t: np.ndarray, idx: np.ndarray, decided: np.ndarray) -> dict[str, Any]:
    """The six metrics of every resample ``idx [B, N]`` of a binary test set, as :func:`classification_metrics`
    computes them (``decided``: ``p >= threshold`` compared in the probabilities' dtype, as there; a ratio with
    an empty denominator is 0, as torchmetrics' ``zero_division``; AUC NaN without both classes), vectorised
    over the resamples."""
    from medpretrain.stats import _binary_auc_rows

    y = t[idx] > 0
    d = decided[idx]
    tp, fp = (d & y).sum(1), (d & ~y).sum(1)
    fn, tn = (~d & y).sum(1), (~d & ~y).sum(1)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(b > 0, a / np.maximum(b, 1), 0.0)

    n_pos = y.sum(1)
    auc = _binary_auc_rows(p[idx], y.astype(np.float64))
    auc = np.where((n_pos > 0) & (n_pos < y.shape[1]), auc, np.nan)
    return {"auc": auc, "accuracy": (tp + tn) / y.shape[1], "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def aggregate(runs: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) over runs (seeds): ``{metric: {"mean", "std", "n"}}``.

    ``std`` is NaN for a single run. Non-finite values are left out of that metric.
    """
    keys = list(keys) if keys is not None else sorted({k for r in runs for k in r})
    out = {}
    for k in keys:
        vals = np.asarray([r[k] for r in runs if k in r and r[k] is not None], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[k] = {
            "mean": float(vals.mean()) if len(vals) else math.nan,
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
            "n": int(len(vals)),
        }
    return out


def epochs_to_fraction_of_best(values: Sequence[float], fraction: float = 0.95) -> int | None:
    """First epoch (1-based) whose value reaches ``fraction`` of the best value (convergence speed).

    ``values`` is the per-epoch validation AUC. Returns ``None`` for an empty or all-NaN curve.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or not np.isfinite(arr).any():
        return None
    target = fraction * np.nanmax(arr)
    hits = np.nonzero(np.nan_to_num(arr, nan=-np.inf) >= target)[0]
    return int(hits[0]) + 1


# Segmentation


def _flat(probs: Tensor | np.ndarray, target: Tensor | np.ndarray,
          roi: Tensor | np.ndarray | None) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(probs).detach().float().cpu()
    t = torch.as_tensor(target).detach().cpu()
    if p.shape != t.shape:
        raise ValueError(f"probs {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    if roi is None:
        return p.reshape(-1), (t > 0.5).reshape(-1).long()
    r = torch.as_tensor(roi).detach().cpu()
    if r.shape != p.shape:
        raise ValueError(f"roi {tuple(r.shape)} and probs {tuple(p.shape)} differ in shape")
    keep = r.reshape(-1) > 0.5
    return p.reshape(-1)[keep], (t > 0.5).reshape(-1)[keep].long()


def segmentation_metrics(probs: Tensor | np.ndarray, target: Tensor | np.ndarray, roi: Tensor | np.ndarray | None = None,
                         *, threshold: float = 0.5, auc_max_pixels: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Pixel metrics of one image (or a stack, pooled) inside ``roi``.

    ``probs`` are foreground probabilities, ``target`` and ``roi`` in {0, 1}, all the same shape. Dice =
    2TP / (2TP + FP + FN), Jaccard = TP / (TP + FP + FN) (both 1.0 when prediction and target are empty),
    sensitivity = TP / (TP + FN), specificity = TN / (TN + FP) (NaN when undefined), pixel ROC AUC through
    torchmetrics on a seeded subsample of at most ``auc_max_pixels`` pixels (NaN with one class).
    """
    p, t = _flat(probs, target, roi)
    pred = p >= threshold
    pos = t.bool()
    tp = float((pred & pos).sum())
    fp = float((pred & ~pos).sum())
    fn = float((~pred & pos).sum())
    tn = float((~pred & ~pos).sum())
    nan = float("nan")
    denom = 2 * tp + fp + fn
    out = {
        "dice": 2 * tp / denom if denom else 1.0,
        "jaccard": tp / (tp + fp + fn) if denom else 1.0,
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "specificity": tn / (tn + fp) if tn + fp else nan,
    }
    if 0 < int(t.sum()) < t.numel():
        if t.numel() > auc_max_pixels:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(t.numel(), generator=g)[:auc_max_pixels]
            p, t = p[idx], t[idx]
        out["auc"] = float(binary_auroc(p, t))
    else:
        out["auc"] = nan
    return out


SEG_THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""Candidate binarisation thresholds of :func:`dice_threshold`: 0.05, 0.10, ..., 0.95."""


def dice_threshold(probs: Sequence[Tensor | np.ndarray], targets: Sequence[Tensor | np.ndarray],
                   rois: Sequence[Tensor | np.ndarray | None] | None = None,
                   grid: Sequence[float] = SEG_THRESHOLD_GRID) -> float:
    """The threshold in ``grid`` that maximises the mean per-image Dice (as :func:`segmentation_metrics` counts
    it, inside each roi) over these images: choose it on validation and apply it to test. Ties go to the
    threshold nearest 0.5, then the lower one. Raises ``ValueError`` for an empty grid or no images."""
    cand = np.asarray(sorted(float(g) for g in grid), dtype=float)
    if cand.size == 0 or len(probs) == 0:
        raise ValueError("dice_threshold needs at least one image and one candidate threshold")
    rois_: Sequence[Tensor | np.ndarray | None] = rois if rois is not None else [None] * len(probs)
    dice = np.zeros((len(probs), cand.size))
    for i, (p, t, r) in enumerate(zip(probs, targets, rois_, strict=True)):
        pf, tf = _flat(p, t, r)
        pos = np.sort(pf[tf.bool()].numpy())
        neg = np.sort(pf[~tf.bool()].numpy())
        # Pixels with prob >= c: counted from the sorted scores (one pass per image for every candidate), the
        # candidates in the probabilities' own dtype, as segmentation_metrics compares them (torch casts the
        # threshold to the tensor's dtype): a probability equal to float32(c) is positive in both.
        c = cand.astype(pos.dtype if pos.size else neg.dtype)
        tp = pos.size - np.searchsorted(pos, c, side="left")
        fp = neg.size - np.searchsorted(neg, c, side="left")
        fn = pos.size - tp
        denom = 2 * tp + fp + fn
        dice[i] = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    mean = dice.mean(0)
    best = np.flatnonzero(np.isclose(mean, mean.max(), rtol=0, atol=1e-12))
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def per_image_metrics(probs: Sequence[Tensor | np.ndarray], targets: Sequence[Tensor | np.ndarray],
                      rois: Sequence[Tensor | np.ndarray | None] | None = None, **kwargs: float) -> list[dict[str, float]]:
    """:func:`segmentation_metrics` of each image."""
    rois_: Sequence[Tensor | np.ndarray | None] = rois if rois is not None else [None] * len(probs)
    return [segmentation_metrics(p, t, r, **kwargs) for p, t, r in zip(probs, targets, rois_, strict=True)]  # type: ignore[arg-type]


def mean_metrics(rows: Sequence[dict[str, float]], keys: Sequence[str] = SEG_METRICS) -> dict[str, float]:
    """Mean over images of each metric (NaNs ignored; NaN when all are NaN)."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def bootstrap_images(rows: Sequence[dict[str, float]], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     keys: Sequence[str] = SEG_METRICS) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CI of the per-image mean of each metric, resampling test images."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    out: dict[str, dict[str, float]] = {}
    if n == 0:
        raise ValueError("bootstrap_images needs at least one image")
    idx = rng.integers(0, n, size=(n_boot, n))
    a = (1 - level) / 2
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        with warnings.catch_warnings():  # all-NaN resamples (e.g. sensitivity on empty masks) give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(v[idx], axis=1)
        means = means[np.isfinite(means)]
        lo, hi = (np.quantile(means, [a, 1 - a]) if means.size else (np.nan, np.nan))
        out[k] = {"low": float(lo), "high": float(hi)}
    return out
