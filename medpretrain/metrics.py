"""Classification metrics through torchmetrics, with bootstrap intervals and seed aggregation.

Every function takes *probabilities* (not logits) and integer / {0, 1} targets:

* ``binary``: ``probs [N]`` (probability of the positive class), ``target [N]`` in {0, 1};
* ``multiclass``: ``probs [N, C]`` (rows sum to 1), ``target [N]`` in ``0..C-1``;
* ``multilabel``: ``probs [N, K]`` (independent sigmoids), ``target [N, K]`` in {0, 1}.

The six reported metrics (:data:`METRICS`) are AUC (ROC AUC; macro one-vs-rest for multi-class, macro
over labels for multi-label), accuracy (fraction of correct predictions; element-wise for multi-label),
sensitivity (= recall), specificity, precision and F1, the last four macro-averaged over classes /
labels when there are more than two. Binary and multi-label predictions threshold at ``threshold``;
multi-class predictions take the arg-max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics.functional import classification as C

Task = Literal["binary", "multiclass", "multilabel"]
METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


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
    threshold: float = 0.5,
) -> dict[str, float]:
    """The six :data:`METRICS` for one set of predictions (floats; AUC is NaN if a class is absent)."""
    p, t = _as_tensors(probs, target)
    n = _check(p, t, task)
    kw: dict[str, Any]
    if task == "binary":
        kw = {"threshold": threshold}
        out = {
            "auc": C.binary_auroc(p, t) if 0 < int(t.sum()) < len(t) else torch.tensor(math.nan),
            "accuracy": C.binary_accuracy(p, t, **kw),
            "sensitivity": C.binary_recall(p, t, **kw),
            "specificity": C.binary_specificity(p, t, **kw),
            "precision": C.binary_precision(p, t, **kw),
            "f1": C.binary_f1_score(p, t, **kw),
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
        kw = {"num_labels": n, "average": "macro", "threshold": threshold}
        out = {
            "auc": C.multilabel_auroc(p, t, num_labels=n, average="macro") if defined else torch.tensor(math.nan),
            "accuracy": C.multilabel_accuracy(p, t, num_labels=n, average="micro", threshold=threshold),
            "sensitivity": C.multilabel_recall(p, t, **kw),
            "specificity": C.multilabel_specificity(p, t, **kw),
            "precision": C.multilabel_precision(p, t, **kw),
            "f1": C.multilabel_f1_score(p, t, **kw),
        }
    return {k: float(v) for k, v in out.items()}


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
    threshold: float = 0.5,
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
    fn = metric_fn or (lambda pp, tt: classification_metrics(pp, tt, task, threshold=threshold))
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = torch.randint(0, len(t), (len(t),), generator=gen)
        for k, v in fn(p[idx], t[idx]).items():
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
