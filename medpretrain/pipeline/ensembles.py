"""Seed ensembles of a fine-tune grid: per (init, regime, label budget), the test probabilities of the seeds
averaged and scored like one run.

Classification: the seeds' ``predictions.npz`` test probabilities averaged, scored with
:func:`medpretrain.metrics.classification_metrics` and its bootstrap at the mean of the members' operating
points (each chosen on validation, :func:`member_threshold`), never at a fixed 0.5. Segmentation: the seeds' probability
maps averaged per pixel and scored per image inside the roi (:func:`seg_ensemble`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpretrain.metrics import (
    bootstrap_ci,
    bootstrap_images,
    classification_metrics,
    mean_metrics,
    per_image_metrics,
    roc_curves,
)
from medpretrain.report import run_regime, run_threshold
from medpretrain.results import RunResult, load_predictions

Run = RunResult | Mapping[str, Any]


def _as_dict(r: Run) -> Mapping[str, Any]:
    """A run's results as a mapping (``run_dir`` included): :class:`RunResult` or an already-read mapping."""
    return r.to_dict() if isinstance(r, RunResult) else r


def seg_ensemble(init: str, regime: str, n_images: float, runs: Sequence[Mapping[str, Any]],
                 n_boot: int) -> dict[str, Any] | None:
    """Segmentation ensemble row: the seeds' test probability maps (``predictions.npz``, uint16) averaged per pixel,
    scored like one run (per-image metrics inside the roi, mean over images, bootstrap over images) at the mean of
    the members' test thresholds (each chosen on validation; ``seg.threshold`` for runs that do not record one).

    Runs without saved maps (older runs) are left out; ``None`` when fewer than two remain. Raises ``ValueError``
    when the runs disagree on the test images, their order, masks or rois.
    """
    runs = [r for r in runs if (Path(r["run_dir"]) / "predictions.npz").is_file()]
    if len(runs) < 2:
        return None
    preds = [load_predictions(Path(r["run_dir"]) / "predictions.npz") for r in runs]
    ref = preds[0]
    for p in preds[1:]:
        if not p.same_cases(ref):
            raise ValueError(f"{init}/{regime}/{n_images:g} images: runs disagree on the test images; cannot ensemble")
    probs = np.mean([p["probs"] for p in preds], axis=0)
    threshold = float(np.mean([run_threshold(r) for r in runs]))
    rows = per_image_metrics(probs, list(ref["masks"]), list(ref["rois"]), threshold=threshold, seed=0)
    return {
        "init": init, "regime": regime, "label_fraction": n_images, "n_train_images": int(n_images), "n": len(runs),
        "seeds": sorted(r["seed"] for r in runs), "metrics": mean_metrics(rows), "threshold": threshold,
        "ci": bootstrap_images(rows, n_boot=n_boot, seed=0),
        "per_image": [{"name": str(name), **m} for name, m in zip(ref["names"], rows, strict=True)],
    }


def member_threshold(runs: Sequence[Mapping[str, Any]]) -> float | list[float] | None:
    """The operating point of a classification seed ensemble: the mean of its members' ``threshold`` (each chosen
    on validation by the run's ``eval.threshold`` rule; per label for multi-label runs). Only the members' test
    probabilities are saved, so the ensemble cannot choose its own on validation; the mean is the closest
    validation-chosen point. ``None`` (arg-max / 0.5) for multi-class runs or when a member recorded none."""
    ths: list[Any] = [r.get("threshold") for r in runs]
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ths):
        return float(np.mean([float(t) for t in ths]))
    if all(isinstance(t, (list, tuple)) for t in ths) and len({len(t) for t in ths}) == 1:
        return [float(v) for v in np.mean(np.asarray(ths, dtype=float), axis=0)]
    return None


def ensembles(results: Sequence[Run], n_boot: int) -> list[dict[str, Any]]:
    """Average test probabilities over the seeds of each (init, regime, label budget) with >= 2 complete runs.
    The regime is :func:`medpretrain.report.run_regime`'s: a multi-task cell is its own group.

    The budget is the label fraction, or for segmentation the number of annotated images (:func:`seg_ensemble`).
    Raises ``ValueError`` when the seeds of a group disagree on the test set.
    """
    groups: dict[tuple[str, str, float, float], list[Mapping[str, Any]]] = {}
    for r in map(_as_dict, results):
        if r.get("status") == "complete":
            budget = float(r["n_train_images"]) if r.get("task") == "segmentation" else float(r["label_fraction"])
            lr = float(((r.get("config") or {}).get("optim") or {}).get("lr") or 0.0)
            groups.setdefault((r["init_label"], run_regime(r), budget, lr), []).append(r)  # multi-task apart
    several_lrs = len({k[3] for k in groups}) > 1
    rows = []
    for (init, regime, frac, lr), runs in sorted(groups.items()):
        if len(runs) < 2:
            continue
        if several_lrs:  # an LR grid: one ensemble per (init, regime, budget, learning rate)
            regime = f"{regime} @ lr {lr:g}"
        if runs[0].get("task") == "segmentation":
            row = seg_ensemble(init, regime, frac, runs, n_boot)
            if row is not None:
                rows.append(row)
            continue
        preds = [load_predictions(Path(r["run_dir"]) / "predictions.npz") for r in runs]
        ref = preds[0]
        for p in preds[1:]:  # same test cases in the same order, or the average means nothing
            if not p.same_cases(ref):
                raise ValueError(f"{init}/{regime}/{frac}: runs disagree on the test set; cannot ensemble")
        probs = np.mean([p.probs for p in preds], axis=0)
        labels, task = ref["labels"], runs[0]["label_task"]
        thr = member_threshold(runs) if task in ("binary", "multilabel") else None
        rows.append({
            "init": init, "regime": regime, "label_fraction": frac, "n": len(runs),
            "seeds": sorted(r["seed"] for r in runs), "threshold": thr,
            "metrics": classification_metrics(probs, labels, task, threshold=thr),
            "ci": bootstrap_ci(probs, labels, task, n_boot=n_boot, seed=0, threshold=thr if thr is not None else 0.5),
            "roc": roc_curves(probs, labels, task, class_names=runs[0]["data"]["class_names"]),
        })
    return rows
