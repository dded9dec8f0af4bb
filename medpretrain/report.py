"""Comparison report: Markdown + CSV + matplotlib (Agg) plots from fine-tuning ``results.json`` files.

Input: a list of result dictionaries as written by ``finetune/run.py`` (one per run: init, regime,
label fraction, seed), plus optional ensemble rows (probabilities, or segmentation probability maps,
averaged over the seeds of one init, computed by ``scripts/compare.py``). Output under ``out_dir``:

* ``report.md``: comparison table (mean +- sd over seeds, per-seed bootstrap CIs, ensemble rows),
  label-efficiency table and curves, ROC curves, a six-metric radar chart per init, learning curves,
  convergence speed (epochs to 95% of the best validation AUC) and wall-clock per epoch, and an
  "unavailable arms" section (e.g. ImageNet weights missing: never replaced by random weights);
* ``runs.csv`` (one row per run) and ``summary.csv`` (one row per init x regime x fraction, and the
  ensemble rows);
* ``label_efficiency.png``, ``roc.png``, ``radar.png``, ``learning_curves.png``.

Segmentation results (``task == "segmentation"``, from ``finetune/run.py task=segmentation``) are
reported the same way with the segmentation metrics (:data:`medpretrain.metrics.SEG_METRICS`, Dice
as the headline), the label budget as the number of annotated training images instead of a fraction,
no ROC / radar, and the prediction overlays of the headline runs copied next to the report; a section
per cell gives the per-image test Dice (seed-averaged per image) with its spread over the test images and
over seeds, the pixel AUC, the thresholds chosen on validation and the optimiser steps (:func:`seg_details`,
``seg_details.csv``), a box / strip plot of the per-image Dice (``dice_per_image.png``) and the best and worst
test image of each init's chosen model (``best_worst.png``, :func:`best_worst`).

Evaluations of finished runs on another data set (``evaluated_from``, :mod:`medpretrain.evaluate`) are no
cells of the comparison: they form a "trained on one set, tested on another" table (:func:`cross_dataset_rows`)
next to each model's score on its own test split.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpretrain import stats
from medpretrain.metrics import METRIC_LABELS, METRICS, aggregate, metric_names
from medpretrain.results import Predictions, RunResult, headline_metric, load_predictions
from medpretrain.utils import atomic_path, atomic_write_text

Result = Mapping[str, Any]
PLOTS = ("label_efficiency.png", "roc.png", "radar.png", "learning_curves.png")
_LABELS = METRIC_LABELS


def is_segmentation(r: Result) -> bool:
    return r.get("task") == "segmentation"


def budget(r: Result) -> float:
    """The label budget of a run: annotated training images (segmentation) or the label fraction."""
    if is_segmentation(r) and r.get("n_train_images") is not None:
        return float(r["n_train_images"])
    return float(r["label_fraction"])


def report_task(results: Sequence[Result]) -> str:
    """``segmentation`` if any result is one, else ``classification`` (the task whose metrics a report shows)."""
    return "segmentation" if any(is_segmentation(r) for r in results) else "classification"


def _metrics_of(results: Sequence[Result]) -> tuple[str, ...]:
    return metric_names(report_task(results))


def as_mappings(results: Sequence[Result | RunResult]) -> list[Result]:
    """Results as ``results.json`` mappings (a :class:`~medpretrain.results.RunResult` through ``to_dict``)."""
    return [r.to_dict() if isinstance(r, RunResult) else r for r in results]


def run_regime(r: Result) -> str:
    """The regime a run is compared under: its ``regime``, and for a multi-task run (``tasks``,
    :mod:`medpretrain.multitask`) `` · <task names joined by +>`` (`` · <K> tasks`` when long), so that a
    multi-task run is never a seed of the single-task cell of the same init, regime and budget."""
    tasks = r.get("tasks")
    if not tasks:
        return str(r["regime"])
    text = "+".join(tasks)
    return f"{r['regime']} · {text if len(text) <= 48 else f'{len(tasks)} tasks'}"


def _key(r: Result) -> tuple[str, str, float]:
    return (str(r["init_label"]), run_regime(r), budget(r))


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def _pm(agg: Mapping[str, float], nd: int = 3) -> str:
    if agg["n"] == 0:
        return "-"
    if agg["n"] == 1 or not math.isfinite(agg["std"]):
        return _fmt(agg["mean"], nd)
    return f"{agg['mean']:.{nd}f} ± {agg['std']:.{nd}f}"


def _frac(f: float) -> str:
    return f"{f:g}"


# ------------------------------------------------------------------------------------------------
# Cells and the guard against nonsense
# ------------------------------------------------------------------------------------------------

CHANCE_AUC = 0.5
"""A headline AUC at or below this is no finding: the model ranks test cases no better than a coin."""

CellKey = tuple[str, str, float, float]


def run_lr(r: Result) -> float | None:
    """The run's (head) learning rate, ``config.optim.lr`` (``None`` when not recorded)."""
    lr = ((r.get("config") or {}).get("optim") or {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _cell_key(r: Result) -> CellKey:
    lr = run_lr(r)
    return (str(r["init_label"]), run_regime(r), budget(r), -1.0 if lr is None else lr)


def is_evaluation(r: Result) -> bool:
    """An evaluation of a finished run on another data set (``evaluated_from``, :mod:`medpretrain.evaluate`): never
    a cell of the comparison, shown as a cross-dataset row instead."""
    return bool(r.get("evaluated_from"))


def _cells(results: Sequence[Result]) -> dict[CellKey, list[Result]]:
    """Complete training runs (evaluations on another set left out) grouped by (init, regime, budget, learning
    rate), each group sorted by seed."""
    groups: dict[CellKey, list[Result]] = defaultdict(list)
    for r in results:
        if r.get("status") == "complete" and not is_evaluation(r):
            groups[_cell_key(r)].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in sorted(groups.items())}


def _predictions_path(r: Result) -> Path | None:
    path = Path(str(r.get("run_dir") or "")) / "predictions.npz"
    return path if r.get("run_dir") and path.is_file() else None


def _load(path: Path) -> Predictions | None:
    try:
        return load_predictions(path)
    except (OSError, ValueError):  # an unreadable file: the caller falls back to the per-seed metrics
        return None


def _dice_per_image(probs: np.ndarray, masks: np.ndarray, rois: np.ndarray, threshold: float) -> np.ndarray:
    """Per-image Dice inside the roi at ``threshold`` (1.0 when prediction and mask are both empty), as
    :func:`medpretrain.metrics.segmentation_metrics` counts it. ``probs``, ``masks``, ``rois``: ``[N, H, W]``."""
    roi = rois > 0.5
    pred, true = (probs >= threshold) & roi, (masks > 0.5) & roi
    tp = (pred & true).sum(axis=(1, 2)).astype(np.float64)
    fp = (pred & ~true).sum(axis=(1, 2))
    fn = (~pred & true).sum(axis=(1, 2))
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.ones_like(tp), where=den > 0)


def trivial_dice(masks: np.ndarray, rois: np.ndarray) -> tuple[float, str]:
    """Mean per-image Dice of the better constant mask inside the roi: all background (1 on an image whose
    mask is empty, else 0) or all foreground (``2 |T| / (|T| + |roi|)``). Returns ``(dice, "background" |
    "foreground")``."""
    roi = rois > 0.5
    pos = ((masks > 0.5) & roi).sum(axis=(1, 2)).astype(np.float64)
    area = roi.sum(axis=(1, 2)).astype(np.float64)
    background = float(np.mean(pos == 0))
    den = pos + area
    foreground = float(np.mean(np.divide(2 * pos, den, out=np.ones_like(pos), where=den > 0)))
    return (background, "background") if background >= foreground else (foreground, "foreground")


_TRIVIAL: dict[tuple[str, int], tuple[float, str]] = {}


def chance_level(runs: Sequence[Result]) -> tuple[float | None, str]:
    """The score a cell must beat to be a finding, and what it is: ``(0.5, "chance")`` for classification;
    for segmentation the :func:`trivial_dice` of the cell's test masks (from the first run with a
    ``predictions.npz``), ``(None, "unknown ...")`` when no run saved its predictions."""
    if not runs or not is_segmentation(runs[0]):
        return CHANCE_AUC, "chance"
    for r in runs:
        path = _predictions_path(r)
        if path is None:
            continue
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _TRIVIAL:
            pred = _load(path)
            if pred is None or pred.masks is None or pred.rois is None:
                continue
            _TRIVIAL[key] = trivial_dice(pred.masks, pred.rois)
        value, kind = _TRIVIAL[key]
        return value, f"all-{kind} mask"
    return None, "unknown (no predictions.npz)"


def failed_check(regime: str, metric: str, test: Mapping[str, Mapping[str, float]], chance: float | None,
                 chance_kind: str) -> str | None:
    """Why a cell is no finding, or ``None``: its mean headline ``metric`` is undefined, or at or below the
    ``chance`` level (AUC 0.5; the better constant mask's Dice). Segmentation without a known baseline: a Dice,
    sensitivity or specificity of 0 (a constant mask). The text names the likely causes."""
    value = test[metric]["mean"]
    if not math.isfinite(value):
        return f"{_LABELS.get(metric, metric)} undefined on the test set (a class missing from it?)"
    if metric == "dice":
        if chance is None:
            sens, spec = test.get("sensitivity", {}).get("mean"), test.get("specificity", {}).get("mean")
            if value > 0 and sens != 0 and spec != 0:
                return None
            why = f"Dice {value:.3f} from a constant mask (sensitivity or specificity 0)"
        elif value > chance:
            return None
        else:
            why = f"Dice {value:.3f} at or below the {chance_kind}'s {chance:.3f}"
        return (why + ": the model does no better than predicting one class; check the optimiser steps at this "
                "label budget, the loss balance (seg.dice_loss_weight) and the threshold")
    if metric == "auc" and value <= CHANCE_AUC:
        frozen = regime == "linear" or regime.startswith("freeze")
        causes = (["the frozen BatchNorm statistics (re-estimate them on the training images)",
                   "the optimiser steps at this label budget"] if frozen else
                  ["the optimiser steps at this label budget", "the frozen BatchNorm statistics"])
        return (f"AUC {value:.3f} at or below chance (0.5): check " + ", ".join(causes)
                + " and the class prior (train vs test prevalence)")
    return None


def summarize(results: Sequence[Result], headline: str = "auc") -> list[dict[str, Any]]:
    """One row per (init, regime, label budget, learning rate) over the completed runs: mean/sd of every test
    metric, of the best validation ``headline`` (``val``), epochs to 95% of the best validation score, seconds
    per epoch, and the per-seed bootstrap CIs of the ``headline`` metric (key ``auc_ci`` whatever the metric,
    for the table code).

    ``lr``: the learning rate (``None`` if not recorded); ``regime_label``: the regime, with ``@ lr <lr>`` when
    the runs hold several learning rates for it. The guard: ``chance`` / ``chance_kind`` (:func:`chance_level`)
    and ``failed`` (:func:`failed_check`: the reason the cell is no finding, else ``None``), ``n_below_chance``
    (seeds at or below it)."""
    metrics = _metrics_of(results)
    cells = _cells(results)
    lrs: dict[tuple[str, str], set[float]] = defaultdict(set)
    for init, regime, _, lr in cells:
        lrs[(init, regime)].add(lr)
    rows = []
    for (init, regime, frac, lr), runs in cells.items():
        agg = aggregate([r["metrics"]["test"] for r in runs], metrics)
        conv = aggregate([{"e95": r.get("epochs_to_95") or math.nan, "s": r["timing"]["mean_epoch_s"],
                           "best": r.get("best_epoch") or math.nan, "st95": r.get("steps_to_95") or math.nan,
                           "sec95": r.get("seconds_to_95") or math.nan} for r in runs])
        val = aggregate([{headline: (r["metrics"].get("val_best") or {}).get(headline, math.nan)} for r in runs])
        chance, chance_kind = chance_level(runs)
        failed = failed_check(regime, headline, agg, chance, chance_kind)
        below = sum(1 for r in runs if chance is not None and not r["metrics"]["test"][headline] > chance)
        rows.append({
            "kind": "single", "init": init, "regime": regime, "label_fraction": frac,
            "lr": None if lr < 0 else lr,
            "regime_label": regime if len(lrs[(init, regime)]) < 2 else f"{regime} @ lr {lr:g}",
            "seeds": [r["seed"] for r in runs], "n": len(runs), "metrics": agg, "val": val[headline],
            "auc_ci": [(r["ci"][headline]["low"], r["ci"][headline]["high"]) for r in runs if r.get("ci")],
            "epochs_to_95": conv["e95"], "epoch_s": conv["s"], "best_epoch": conv["best"],
            "steps_to_95": conv["st95"], "seconds_to_95": conv["sec95"],
            "train_size": runs[0]["data"].get("train_size"), "multitask": bool(runs[0].get("tasks")),
            "chance": chance, "chance_kind": chance_kind, "failed": failed, "n_below_chance": below,
        })
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _runs_csv(results: Sequence[Result], headline: str = "auc") -> str:
    rows = []
    metrics = _metrics_of(results)
    for r in results:
        row: dict[str, Any] = {"init": r.get("init_label"), "regime": r.get("regime"),
                               "label_fraction": r.get("label_fraction"), "seed": r.get("seed"),
                               "status": r.get("status"), "reason": r.get("reason", "")}
        if is_segmentation(r):
            row["n_train_images"] = r.get("n_train_images")
        if is_evaluation(r):
            row.update(evaluated_from=r["evaluated_from"], tested_on=(r.get("data") or {}).get("dataset"))
        if r.get("status") == "complete":
            for m in metrics:
                row[f"test_{m}"] = r["metrics"]["test"][m]
                row[f"test_{m}_ci_low"] = r["ci"][m]["low"]
                row[f"test_{m}_ci_high"] = r["ci"][m]["high"]
            row.update(best_epoch=r.get("best_epoch"), epochs_run=r.get("epochs_run"),
                       **{f"best_val_{headline}": r["metrics"]["val_best"][headline]}, epochs_to_95=r.get("epochs_to_95"),
                       mean_epoch_s=r["timing"]["mean_epoch_s"], train_size=r["data"].get("train_size"),
                       config_hash=r.get("config_hash"), run_dir=r.get("run_dir", ""))
        rows.append(row)
    return _csv_text(rows)


def _summary_csv(rows: list[dict[str, Any]], ensembles: Sequence[Mapping[str, Any]],
                 metrics: Sequence[str] = METRICS, budget_name: str = "label_fraction") -> str:
    out = []
    for s in rows:
        row: dict[str, Any] = {"kind": "single", "init": s["init"], "regime": s["regime"],
                               budget_name: s["label_fraction"], "n_seeds": s["n"]}
        for m in metrics:
            row[f"{m}_mean"] = s["metrics"][m]["mean"]
            row[f"{m}_std"] = s["metrics"][m]["std"]
        row.update(epochs_to_95_mean=s["epochs_to_95"]["mean"], epoch_s_mean=s["epoch_s"]["mean"],
                   val_mean=s["val"]["mean"], lr=s["lr"], failed=s["failed"] or "")
        out.append(row)
    for e in ensembles:
        row = {"kind": "ensemble", "init": e["init"], "regime": e["regime"], budget_name: e["label_fraction"],
               "n_seeds": e["n"]}
        for m in metrics:
            row[f"{m}_mean"] = e["metrics"][m]
            row[f"{m}_ci_low"] = e["ci"][m]["low"]
            row[f"{m}_ci_high"] = e["ci"][m]["high"]
        out.append(row)
    return _csv_text(out)


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg; every figure saved atomically)
# ------------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _colors(inits: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {init: cmap(i % 10) for i, init in enumerate(inits)}


def plot_label_efficiency(rows: list[dict[str, Any]], path: Path, metric: str = "auc",
                          xlabel: str = "label fraction") -> Path:
    """Test metric (mean +- sd over seeds) against label fraction: one panel per regime, one line per init."""
    plt = _plt()
    regimes = sorted({r["regime"] for r in rows})
    inits = sorted({r["init"] for r in rows})
    colors = _colors(inits)
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(4.5 * max(1, len(regimes)), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=False):
        for init in inits:
            pts = sorted((r["label_fraction"], r["metrics"][metric]) for r in rows
                         if r["regime"] == regime and r["init"] == init)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            es = [p[1]["std"] if math.isfinite(p[1]["std"]) else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=init, color=colors[init])
        fracs = sorted({r["label_fraction"] for r in rows})
        if len(fracs) > 1 and fracs[-1] / max(fracs[0], 1e-9) >= 5:
            ax.set_xscale("log")
        ax.set_xticks(fracs, [_frac(f) for f in fracs])
        ax.xaxis.set_minor_formatter(NullFormatter())  # label only the measured fractions
        ax.set_title(f"regime: {regime}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {_LABELS.get(metric, metric)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(curves: Mapping[str, Mapping[str, Mapping[str, list[float]]]], path: Path, title: str = "") -> Path:
    """ROC curves: ``curves[init][class_name] = {"fpr", "tpr", "auc"}``; one panel per class, a line per init."""
    plt = _plt()
    names: list[str] = []
    for per_init in curves.values():
        names += [n for n in per_init if n not in names]
    names = names or ["(none)"]
    colors = _colors(list(curves))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for init, per_init in curves.items():
            c = per_init.get(name)
            if c:
                ax.plot(c["fpr"], c["tpr"], label=f"{init} (AUC {c['auc']:.3f})", color=colors[init])
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_title(f"{name} vs rest" if len(names) > 1 else name)
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("sensitivity (TPR)")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_radar(rows: list[dict[str, Any]], path: Path) -> Path:
    """Six-metric radar chart, one polar panel per init, one polygon per regime (mean over seeds)."""
    plt = _plt()
    inits = sorted({r["init"] for r in rows})
    regimes = sorted({r["regime"] for r in rows})
    colors = _colors(regimes)
    angles = np.linspace(0, 2 * np.pi, len(METRICS), endpoint=False).tolist()
    n = max(1, len(inits))
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.9), subplot_kw={"projection": "polar"}, squeeze=False)
    for ax, init in zip(axes[0], inits, strict=False):
        for r in rows:
            if r["init"] != init:
                continue
            vals = [r["metrics"][m]["mean"] if math.isfinite(r["metrics"][m]["mean"]) else 0.0 for m in METRICS]
            ax.plot(angles + angles[:1], vals + vals[:1], color=colors[r["regime"]], label=r["regime"])
            ax.fill(angles + angles[:1], vals + vals[:1], color=colors[r["regime"]], alpha=0.1)
        ax.set_xticks(angles, [_LABELS[m] for m in METRICS], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7)
        ax.set_rlabel_position(90)
        ax.set_title(init, fontsize=10, pad=14)
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.25, -0.15))
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(results: Sequence[Result], path: Path, val_key: str = "val_auc") -> Path:
    """Validation score ``val_key`` (top) and training loss (bottom) per epoch, mean over seeds; a column per regime."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    done = [r for r in results if r.get("status") == "complete"]
    regimes = sorted({run_regime(r) for r in done}) or ["-"]
    inits = sorted({r["init_label"] for r in done})
    colors = _colors(inits)
    fig, axes = plt.subplots(2, len(regimes), figsize=(4.5 * len(regimes), 6), squeeze=False)
    for j, regime in enumerate(regimes):
        for init in inits:
            runs = [r for r in done if run_regime(r) == regime and r["init_label"] == init]
            if not runs:
                continue
            for i, key in enumerate((val_key, "train_loss")):
                curves = [[h[key] for h in r["history"]] for r in runs]
                length = min(len(c) for c in curves)
                arr = np.asarray([c[:length] for c in curves], dtype=float)
                seen = ~np.isnan(arr).all(axis=0)  # a kNN read-out has no training loss: nothing to average
                if not seen.any():
                    continue
                mean = np.full(length, np.nan)
                mean[seen] = np.nanmean(arr[:, seen], axis=0)
                axes[i][j].plot(range(1, length + 1), mean, color=colors[init], label=init)
        axes[0][j].set_title(f"regime: {regime}")
        axes[0][j].set_ylabel(val_key.replace("_", " "))
        axes[1][j].set_ylabel("train loss")
        axes[1][j].set_xlabel("epoch")
        for i in range(2):
            axes[i][j].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def reuse_rows(results: Sequence[Result], budget_value: float) -> list[dict[str, Any]]:
    """Per (init, regime) at ``budget_value``: the mean over seeds of each stage's weight change and CKA (the
    ``transfer`` field of the runs, :mod:`medpretrain.transfer`); runs without it are left out."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get("status") == "complete" and r.get("transfer") and budget(r) == budget_value:
            groups[(str(r["init_label"]), run_regime(r))].append(r["transfer"])
    rows = []
    for (init, regime), ts in sorted(groups.items()):
        stages = ts[0]["stages"]
        ts = [t for t in ts if t["stages"] == stages]
        rows.append({"init": init, "regime": regime, "stages": stages, "n": len(ts),
                     "weight_change": np.mean([t["weight_change"] for t in ts], axis=0).tolist(),
                     "cka": np.mean([t["cka"] for t in ts], axis=0).tolist()})
    return rows


def plot_reuse(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Relative weight change (left) and CKA before vs after fine-tuning (right) per stage, a line per
    init / regime (Raghu et al. 2019, Fig. 4-5)."""
    plt = _plt()
    colors = _colors(sorted({r["init"] for r in rows}))
    styles = dict(zip(sorted({r["regime"] for r in rows}), ("-", "--", ":", "-."), strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        x = range(len(r["stages"]))
        for ax, key in zip(axes, ("weight_change", "cka"), strict=True):
            ax.plot(x, r[key], marker="o", color=colors[r["init"]], ls=styles.get(r["regime"], "-"),
                    label=f"{r['init']} / {r['regime']}")
    for ax, ylabel in zip(axes, ("relative weight change ||w - w0|| / ||w0||", "CKA (before vs after)"),
                          strict=True):
        names = max((r["stages"] for r in rows), key=len) if rows else []
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1.05)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def reuse_k_rows(rows: Sequence[Mapping[str, Any]], budget_value: float, metric: str) -> list[dict[str, Any]]:
    """The ``reinit:<k>`` sweep at ``budget_value`` (keep the lowest ``k`` stages, re-initialise the rest): per
    init and ``k``, the test ``metric`` and steps to 95% of the best validation score (mean, sd, n over seeds);
    ``full`` is the sweep's end (every stage kept), shown as ``k = None``."""
    out = []
    for s in rows:
        if s["label_fraction"] != budget_value or s["failed"]:
            continue
        kind, _, k_text = s["regime"].partition(":")
        if kind == "reinit" and k_text.isdigit():  # a multi-task cell (reinit:<k> · <tasks>) is no point of it
            k: int | None = int(k_text)
        elif s["regime"] == "full":
            k = None
        else:
            continue
        out.append({"init": s["init"], "k": k, "lr": s["lr"], "metric": s["metrics"][metric],
                    "steps_to_95": s["steps_to_95"]})
    return sorted(out, key=lambda r: (r["init"], math.inf if r["k"] is None else r["k"]))


def plot_reuse_k(rows: Sequence[Mapping[str, Any]], path: Path, metric: str) -> Path:
    """Test ``metric`` (left) and steps to 95% of the best validation score (right) against the number of
    lowest stages kept from the init; ``full`` at the right end."""
    plt = _plt()
    colors = _colors(sorted({r["init"] for r in rows}))
    ks = sorted({r["k"] for r in rows if r["k"] is not None})
    x_of = {k: i for i, k in enumerate(ks)} | {None: len(ks)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for init in sorted({r["init"] for r in rows}):
        mine = [r for r in rows if r["init"] == init]
        xs = [x_of[r["k"]] for r in mine]
        for ax, key in zip(axes, ("metric", "steps_to_95"), strict=True):
            ys = [r[key]["mean"] for r in mine]
            err = [0.0 if not math.isfinite(r[key]["std"]) else r[key]["std"] for r in mine]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[init], label=init)
    for ax, ylabel in zip(axes, (f"test {_LABELS[metric]}", "steps to 95% of best val"), strict=True):
        ax.set_xticks(range(len(ks) + 1), [str(k) for k in ks] + ["full"])
        ax.set_xlabel("lowest stages kept from the init (reinit:<k>)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _overlay_section(done: Sequence[Result], out: Path, regime: str, n_images: float) -> list[str]:
    """Copy the ``overlays.png`` of the lowest-seed run of each init (headline regime / budget) into ``out``."""
    import shutil

    md = ["## Prediction overlays", "",
          f"Regime `{regime}`, {n_images:g} annotated images, first test images: green true positive, red false "
          "positive, blue false negative, inside the field of view.", ""]
    for init in sorted({str(r["init_label"]) for r in done}):
        runs = sorted((r for r in done if _key(r) == (init, regime, n_images)), key=lambda r: r["seed"])
        src = Path(str(runs[0].get("run_dir", ""))) / "overlays.png" if runs else None
        if src is None or not src.is_file():
            continue
        name = f"overlays_{init}.png".replace("/", "_")
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)
        md += [f"**{init}** (seed {runs[0]['seed']}):", "", f"![{init} overlays]({name})", ""]
    return md


# ------------------------------------------------------------------------------------------------
# Segmentation: per-image Dice, threshold, steps, best and worst test images
# ------------------------------------------------------------------------------------------------

SEG_PLOTS = ("dice_per_image.png", "best_worst.png")


def per_image_scores(r: Result, metric: str = "dice") -> dict[str, float]:
    """``{image name: metric}`` from a segmentation run's ``per_image`` rows (empty when it has none)."""
    return {str(p.get("name")): float(p[metric]) for p in r.get("per_image") or []
            if isinstance(p.get(metric), (int, float))}


def spread(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``n, mean, sd`` (sample; NaN for one value), ``min, q1, median, q3, max`` of finite ``values``."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not len(x):
        return {"n": 0, **dict.fromkeys(("mean", "sd", "min", "q1", "median", "q3", "max"), math.nan)}
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"n": int(len(x)), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
            "min": float(x.min()), "q1": float(q1), "median": float(med), "q3": float(q3), "max": float(x.max())}


def _range(values: Sequence[float], nd: int) -> str:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.{nd}f}" if lo == hi else f"{np.mean(vals):.{nd}f} ({lo:.{nd}f}-{hi:.{nd}f})"


def seg_details(results: Sequence[Result | RunResult]) -> list[dict[str, Any]]:
    """Per segmentation cell (init, regime, image budget, learning rate; training runs only): the per-image test
    Dice, averaged over the seeds image by image (images matched by name), with its spread over the test images
    (:func:`spread`: ``images``), the spread of the runs' mean Dice over seeds (``seeds``: mean, sd, n), the pixel
    AUC over seeds (``auc``), the thresholds chosen on validation (``thresholds``, ``threshold_rule``), the
    optimiser steps run (``steps``), and ``per_image`` (name -> seed-averaged Dice) for the plots."""
    results = as_mappings(results)
    rows = summarize(results, headline="dice")
    cells = _cells(results)
    out = []
    for s in rows:
        runs = cells[(s["init"], s["regime"], s["label_fraction"], -1.0 if s["lr"] is None else s["lr"])]
        per = [per_image_scores(r) for r in runs]
        names = [n for n in per[0] if all(n in p for p in per[1:])] if per else []
        avg = {n: float(np.mean([p[n] for p in per])) for n in names}
        out.append({"init": s["init"], "regime": s["regime"], "regime_label": s["regime_label"], "lr": s["lr"],
                    "budget": s["label_fraction"], "seeds": s["seeds"], "images": spread(list(avg.values())),
                    "seed_mean": s["metrics"]["dice"], "auc": s["metrics"]["auc"],
                    "thresholds": [run_threshold(r) for r in runs],
                    "threshold_rule": next((str(r["threshold_rule"]) for r in runs if r.get("threshold_rule")), ""),
                    "steps": [r.get("optimizer_steps") for r in runs], "per_image": avg, "failed": s["failed"]})
    return out


def _budget_text(b: float) -> str:
    return "all" if b == 0 else f"{b:g}"


def seg_details_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table of :func:`seg_details` (also read from an ``experiment.json``)."""
    if not rows:
        return []
    rules = sorted({r["threshold_rule"] for r in rows if r.get("threshold_rule")})
    md = ["| init | regime | images | per-image Dice: mean ± sd [min, Q1-Q3, max] (test images) | Dice over seeds "
          "| pixel AUC | threshold (validation) | optimiser steps |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i = r["images"]
        if i["n"]:
            images = (f"{_fmt(i['mean'])} ± {_fmt(i['sd'])} [{_fmt(i['min'])}, {_fmt(i['q1'])}-{_fmt(i['q3'])}, "
                      f"{_fmt(i['max'])}] (n={i['n']})")
        else:
            images = "- (no per-image results)"
        steps = [float(x) for x in r["steps"] if isinstance(x, (int, float))]
        md.append(f"| {r['init']} | {r['regime_label']} | {_budget_text(r['budget'])} | {images} | "
                  f"{_pm(r['seed_mean'])} (n={r['seed_mean']['n']}) | {_pm(r['auc'])} | "
                  f"{_range(r['thresholds'], 2)} | {_range(steps, 0)} |")
    md += ["", "Per-image Dice: each test image's Dice averaged over the seeds, then its spread over the test images; "
               "over seeds: mean ± sd of the runs' mean Dice. Threshold: the one each run chose on its validation "
               "images and applied to test" + (f" ({'; '.join(rules)})" if rules else "")
               + "; mean (range) over seeds when they differ."]
    return md


def plot_dice_per_image(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Box plot with the points (seeded jitter) of the per-image test Dice (seed-averaged, :func:`seg_details`): one
    panel per image budget, one box per init / regime."""
    plt = _plt()
    budgets = sorted({r["budget"] for r in rows})
    colors = _colors(sorted({r["init"] for r in rows}))
    rng = np.random.default_rng(0)
    per_panel = max([sum(1 for r in rows if r["budget"] == b) for b in budgets] or [1])
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=((1.5 + 1.1 * per_panel) * max(1, len(budgets)), 3.8),
                             squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=False):
        mine = [r for r in rows if r["budget"] == b and r["per_image"]]
        data = [list(r["per_image"].values()) for r in mine]
        if data:
            ax.boxplot(data, widths=0.5, showfliers=False)
            for k, (r, d) in enumerate(zip(mine, data, strict=True), start=1):
                ax.scatter(k + rng.uniform(-0.15, 0.15, len(d)), d, s=12, alpha=0.75, color=colors[r["init"]],
                           zorder=3)
            ax.set_xticks(range(1, len(mine) + 1), [f"{r['init']}\n{r['regime_label']}" for r in mine], fontsize=7)
        ax.set_title(f"{_budget_text(b)} annotated images")
        ax.set_ylabel("test Dice per image (mean over seeds)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def _val_dice(r: Result) -> float:
    v = (r["metrics"].get("val_best") or {}).get("dice", math.nan)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def _image(pred: Predictions, names: np.ndarray, dice: np.ndarray, i: int) -> dict[str, Any]:
    assert pred.masks is not None and pred.rois is not None
    return {"name": str(names[i]), "dice": float(dice[i]), "probs": pred.probs[i], "mask": pred.masks[i],
            "roi": pred.rois[i]}


def best_worst(results: Sequence[Result | RunResult], budget_value: float) -> list[dict[str, Any]]:
    """Per init at ``budget_value``: its configuration chosen on validation (as :func:`recommend` chooses it; failed
    cells only when it has no other), of that cell the seed with the best validation Dice (ties: the lowest seed),
    and that run's best and worst test image by per-image Dice of its saved maps at its threshold. Each row:
    ``init, regime_label, seed, run_dir, threshold`` and ``best`` / ``worst`` = ``{name, dice, probs, mask, roi}``.
    Inits whose chosen run saved no ``predictions.npz`` are left out."""
    results = as_mappings(results)
    rows = [s for s in summarize(results, headline="dice") if s["label_fraction"] == budget_value]
    cells = _cells(results)
    out = []
    for init in sorted({s["init"] for s in rows}):
        mine = [s for s in rows if s["init"] == init]
        c = _choose([s for s in mine if not s["failed"]] or mine)
        runs = cells[(c["init"], c["regime"], c["label_fraction"], -1.0 if c["lr"] is None else c["lr"])]
        run = sorted(runs, key=lambda r: (-_val_dice(r), r["seed"]))[0]
        path = _predictions_path(run)
        pred = _load(path) if path is not None else None
        if pred is None or pred.masks is None or pred.rois is None:
            continue
        thr = run_threshold(run)
        dice = _dice_per_image(pred.probs, pred.masks, pred.rois, thr)
        names = pred.names if pred.names is not None else pred.index

        out.append({"init": init, "regime_label": c["regime_label"], "seed": run["seed"], "run_dir": run["run_dir"],
                    "threshold": thr, "best": _image(pred, names, dice, int(np.argmax(dice))),
                    "worst": _image(pred, names, dice, int(np.argmin(dice)))})
    return out


def error_overlay(probs: np.ndarray, mask: np.ndarray, roi: np.ndarray, threshold: float) -> np.ndarray:
    """RGB ``[H, W, 3]`` of the prediction at ``threshold`` against the mask inside the roi: green true positive, red
    false positive, blue false negative, dark grey true negative, black outside the roi (as ``overlays.png``)."""
    inside = roi > 0.5
    yhat, gt = (probs >= threshold) & inside, (mask > 0.5) & inside
    rgb = np.zeros((*gt.shape, 3), dtype=np.float32)
    rgb[inside] = (0.15, 0.15, 0.15)
    rgb[yhat & gt] = (0.0, 0.8, 0.0)
    rgb[yhat & ~gt] = (0.9, 0.1, 0.1)
    rgb[~yhat & gt] = (0.2, 0.4, 1.0)
    return rgb


def plot_best_worst(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per init (:func:`best_worst`): the worst and the best test image, each as its probability map and its
    :func:`error_overlay` at the run's threshold."""
    plt = _plt()
    fig, axes = plt.subplots(max(1, len(rows)), 4, figsize=(12, 3.2 * max(1, len(rows))), squeeze=False)
    for ax_row, r in zip(axes, rows, strict=False):
        for j, which in enumerate(("worst", "best")):
            im = r[which]
            ax_row[2 * j].imshow(np.where(im["roi"] > 0.5, im["probs"], 0.0), cmap="gray", vmin=0, vmax=1)
            ax_row[2 * j].set_title(f"{r['init']} {which}: {im['name']} (Dice {im['dice']:.3f})", fontsize=8)
            ax_row[2 * j + 1].imshow(error_overlay(im["probs"], im["mask"], im["roi"], r["threshold"]))
            ax_row[2 * j + 1].set_title(f"at {r['threshold']:g}: TP green, FP red, FN blue", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _seg_section(results: Sequence[Result], out: Path, budget_value: float) -> list[str]:
    """The report's per-image Dice / threshold / steps table, ``seg_details.csv``, the per-image Dice plot and the
    best / worst images at ``budget_value``."""
    rows = seg_details(results)
    if not rows:
        return []
    md = ["## Per-image Dice, threshold and steps", "", *seg_details_markdown(rows), ""]
    atomic_write_text(out / "seg_details.csv", _csv_text([
        {"init": r["init"], "regime": r["regime_label"], "n_train_images": r["budget"], "n_seeds": len(r["seeds"]),
         **{f"image_dice_{k}": v for k, v in r["images"].items()}, "dice_seed_mean": r["seed_mean"]["mean"],
         "dice_seed_sd": r["seed_mean"]["std"], "auc_mean": r["auc"]["mean"], "auc_sd": r["auc"]["std"],
         "thresholds": " ".join(f"{t:g}" for t in r["thresholds"]),
         "optimizer_steps": " ".join(str(x) for x in r["steps"])} for r in rows]))
    if any(r["per_image"] for r in rows):
        plot_dice_per_image(rows, out / SEG_PLOTS[0])
        md += [f"![per-image Dice]({SEG_PLOTS[0]})", ""]
    extremes = best_worst(results, budget_value)
    if extremes:
        plot_best_worst(extremes, out / SEG_PLOTS[1])
        md += ["### Best and worst test images", "",
               f"{_budget_text(budget_value)} annotated images: per init, the configuration chosen on validation and "
               "of its seeds the one with the best validation Dice; its worst and best test image by per-image Dice "
               "(probability map, then the errors at the run's threshold inside the field of view).", "",
               "| init | regime | seed | worst image | Dice | best image | Dice |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['init']} | {r['regime_label']} | {r['seed']} | {r['worst']['name']} | {r['worst']['dice']:.3f} | "
               f"{r['best']['name']} | {r['best']['dice']:.3f} |" for r in extremes]
        md += ["", f"![best and worst test images]({SEG_PLOTS[1]})", ""]
    return md


# ------------------------------------------------------------------------------------------------
# Cross-dataset: trained on A, tested on B (medpretrain.evaluate)
# ------------------------------------------------------------------------------------------------


def cross_dataset_rows(results: Sequence[Result | RunResult], metric: str | None = None) -> list[dict[str, Any]]:
    """Per (init, regime, budget, trained on, tested on, split) over the complete evaluations (:func:`is_evaluation`):
    the headline ``metric`` on the new set (``tested``) and on the run's own test split (``own``, from
    ``data.trained_on.test_metrics``), mean / sd / n over seeds, ``gap`` (tested - own, mean over seeds), and for
    segmentation the per-image Dice on the new set (``images``: :func:`spread` of the seed-averaged values), its
    pixel AUC (``auc``) and the thresholds carried over."""
    evaluations = [r for r in as_mappings(results) if r.get("status") == "complete" and is_evaluation(r)]
    if not evaluations:
        return []
    metric = metric or headline_metric(report_task(evaluations))
    groups: dict[tuple[Any, ...], list[Result]] = defaultdict(list)
    for r in evaluations:
        data = r.get("data") or {}
        groups[(str(r["init_label"]), str(r["regime"]), budget(r), str((data.get("trained_on") or {}).get("dataset")),
                str(data.get("dataset")), str(data.get("split", "test")))].append(r)
    out = []
    for (init, regime, b, src, dst, split), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r.get("seed") or 0)
        own = [((r["data"].get("trained_on") or {}).get("test_metrics") or {}).get(metric, math.nan) for r in runs]
        tested = [r["metrics"]["test"][metric] for r in runs]
        gaps = [t - o for t, o in zip(tested, own, strict=True) if math.isfinite(t - o)]
        row: dict[str, Any] = {
            "init": init, "regime": regime, "budget": b, "trained_on": src, "tested_on": dst, "split": split,
            "metric": metric, "seeds": [r.get("seed") for r in runs], "sizes": sorted({r["data"].get("test_size")
                                                                                        for r in runs}),
            "tested": aggregate([{"m": v} for v in tested])["m"], "own": aggregate([{"m": v} for v in own])["m"],
            "gap": float(np.mean(gaps)) if gaps else math.nan,
            "evaluated_from": [r["evaluated_from"] for r in runs], "segmentation": is_segmentation(runs[0]),
        }
        if row["segmentation"]:
            per = [per_image_scores(r) for r in runs]
            names = [n for n in per[0] if all(n in p for p in per[1:])]
            row["images"] = spread([float(np.mean([p[n] for p in per])) for n in names])
            row["auc"] = aggregate([{"m": r["metrics"]["test"].get("auc", math.nan)} for r in runs])["m"]
            row["thresholds"] = [run_threshold(r) for r in runs]
        out.append(row)
    return out


def cross_dataset_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The "trained on A, tested on B" table of :func:`cross_dataset_rows`."""
    if not rows:
        return []
    name = _LABELS.get(rows[0]["metric"], rows[0]["metric"])
    seg = any(r["segmentation"] for r in rows)
    md = ["## Trained on one set, tested on another", "",
          f"Each fine-tuned model evaluated without retraining (`scripts/evaluate.py`) on another data set, at the "
          f"threshold it chose on its own validation images; test {name} mean ± sd over seeds on its own test split "
          "and on the other set, and the gap (other - own, mean over seeds).", "",
          f"| init | regime | {'images' if seg else 'labels'} | trained on | tested on | seeds | own test {name} | "
          f"{name} there | gap |" + (" per-image Dice there: mean ± sd [min, max] | pixel AUC there | threshold |"
                                      if seg else ""),
          "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if seg else "")]
    for r in rows:
        b = _budget_text(r["budget"]) if r["segmentation"] else _frac(r["budget"])
        split = f" ({r['split']}, n={'/'.join(str(x) for x in r['sizes'])})"
        line = (f"| {r['init']} | {r['regime']} | {b} | `{r['trained_on']}` | `{r['tested_on']}`{split} | "
                f"{len(r['seeds'])} | {_pm(r['own'])} | {_pm(r['tested'])} | "
                f"{'-' if not math.isfinite(r['gap']) else format(r['gap'], '+.3f')} |")
        if seg:
            i = r.get("images") or {"n": 0}
            line += (f" {_fmt(i['mean'])} ± {_fmt(i['sd'])} [{_fmt(i['min'])}, {_fmt(i['max'])}] |" if i["n"]
                     else " - |")
            line += f" {_pm(r['auc'])} | {_range(r['thresholds'], 2)} |" if "auc" in r else " - | - |"
        md.append(line)
    md.append("")
    return md


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _headline(results: Sequence[Result]) -> tuple[float | None, str | None]:
    done = [r for r in results if r.get("status") == "complete" and not is_evaluation(r)]
    if not done:
        return None, None
    frac = max(budget(r) for r in done)
    regimes = sorted({run_regime(r) for r in done if budget(r) == frac})
    return frac, ("full" if "full" in regimes else regimes[0])


def build_report(
    results: Sequence[Result | RunResult],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Initialisation comparison",
    ensembles: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    metric: str | None = None,
) -> Path:
    """Write ``report.md``, ``runs.csv``, ``summary.csv`` and the plots to ``out_dir``; return the report path.

    ``results``: run results (``results.json`` mappings or :class:`~medpretrain.results.RunResult`; ``status``
    complete / unavailable / failed). ``ensembles``: rows with
    ``init, regime, label_fraction, n, metrics{m: value}, ci{m: {low, high}}, roc`` (optional).
    ``notes``: free text lines (protocol remarks such as a smaller local train split). ``metric``: the
    headline metric (default AUC, Dice for segmentation results).
    """
    results = as_mappings(results)
    task = report_task(results)
    seg = task == "segmentation"
    metrics = metric_names(task)
    metric = metric or headline_metric(task)
    if metric not in metrics:
        raise ValueError(f"metric must be one of {metrics}, got {metric!r}")
    if seg and any(not is_segmentation(r) for r in results):
        raise ValueError("build_report: segmentation and classification results cannot share one report")
    val_key = f"val_{headline_metric(task)}"  # the selection score logged per epoch
    budget_name = "n_train_images" if seg else "label_fraction"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, headline=metric)
    done = [r for r in results if r.get("status") == "complete" and not is_evaluation(r)]
    evaluated = [r for r in results if r.get("status") == "complete" and is_evaluation(r)]
    unavailable = [r for r in results if r.get("status") == "unavailable"]
    failed = [r for r in results if r.get("status") not in ("complete", "unavailable")]

    atomic_write_text(out / "runs.csv", _runs_csv(results, headline=metric))
    atomic_write_text(out / "summary.csv", _summary_csv(rows, ensembles, metrics, budget_name))

    md: list[str] = [f"# {title}", ""]
    md.append(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(results)} run(s): "
              f"{len(done)} complete, {len(unavailable)} unavailable, {len(failed)} failed"
              + (f", {len(evaluated)} evaluation(s) of finished runs on another data set" if evaluated else "") + ".")
    datasets = sorted({str(r["config"]["data"]["dataset"]) for r in done if "config" in r})
    if datasets:
        md.append(f"Data: {', '.join(f'`{d}`' for d in datasets)}; task: "
                  f"{', '.join(sorted({str(r.get('label_task')) for r in done}))}. "
                  f"Model selection on the validation split only (best validation {_LABELS[metric]}); each run "
                  "evaluates its test split once.")
    if seg:
        md.append("Segmentation: per-image pixel metrics inside the region of interest (DRIVE: the field of "
                  "view), averaged over test images; whole images by sliding-window inference; the label "
                  "budget is the number of annotated training images (seeded draw).")
    md += [f"- {n}" for n in notes]
    md.append("")
    if rows:
        md += ["## Which initialisation?", "", *recommendation_markdown(recommend(results, metric), seg=seg), ""]

    md += ["## Comparison (test set)", "",
           f"Mean ± sample sd over seeds; per-seed 95% percentile-bootstrap CIs of the test {_LABELS[metric]}; "
           + ("ensemble rows average the seeds' test probability maps per pixel (saved in 1/65535 steps) and "
              "score them like one run (CI from the bootstrap over test images)" if seg
              else "ensemble rows average the test probabilities of the seeds of one init, thresholded at the mean "
              "of the seeds' validation-chosen operating points (shown; CI from the bootstrap of that ensemble)") + ".",
           "", f"| init | regime | {'images' if seg else 'labels'} | model | "
           + " | ".join(_LABELS[m] for m in metrics) + f" | {_LABELS[metric]} 95% CI | epochs to 95% | s/epoch |",
           "|" + "---|" * (len(metrics) + 7)]
    ens_by_key = {(e["init"], e["regime"], float(e["label_fraction"])): e for e in ensembles}
    for s in rows:
        cis = "; ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in s["auc_ci"])
        md.append(f"| {s['init']} | {s['regime_label']} | {_frac(s['label_fraction'])} ({s['train_size']}) | "
                  f"single (n={s['n']}){' ✗ failed' if s['failed'] else ''} | "
                  + " | ".join(_pm(s["metrics"][m]) for m in metrics)
                  + f" | {cis} | {_pm(s['epochs_to_95'], 1)} | {_fmt(s['epoch_s']['mean'], 1)} |")
        e = ens_by_key.get((s["init"], s["regime"], s["label_fraction"]))
        if e:
            thr = e.get("threshold")
            at = (f" at {thr:.3f}" if isinstance(thr, float) else
                  " at " + "/".join(f"{v:.2f}" for v in thr) if isinstance(thr, list) else "")
            md.append(f"| {s['init']} | {s['regime']} | {_frac(s['label_fraction'])} | ensemble of {e['n']}{at} | "
                      + " | ".join(_fmt(e["metrics"][m]) for m in metrics)
                      + f" | [{e['ci'][metric]['low']:.3f}, {e['ci'][metric]['high']:.3f}] | | |")
    bad = [s for s in rows if s["failed"]]
    if bad:
        md += ["", "✗ failed cells, not findings (left out of the recommendation and the label-efficiency plot):"]
        md += [f"- {s['init']} / {s['regime_label']} / {_frac(s['label_fraction'])}: {s['failed']}"
               + (f" ({s['n_below_chance']} of {s['n']} seeds)" if s["n"] > 1 else "") + "." for s in bad]
    md.append("")

    if rows:
        md += ["## Label efficiency", "",
               f"Test {_LABELS[metric]} (mean ± sd over seeds) against "
               + ("the number of annotated training images (seeded draws)." if seg
                  else "the fraction of training labels (stratified, seeded subsets)."), "",
               *efficiency_markdown(rows, metric, seg=seg)]
        md += ["", f"![label efficiency]({PLOTS[0]})", ""]
        plot_label_efficiency([{**s, "regime": s["regime_label"]} for s in rows if not s["failed"]], out / PLOTS[0],
                              metric,
                              xlabel="annotated training images" if seg else "label fraction")

        head_frac, head_regime = _headline(results)
        frac, regime = float(head_frac or 1.0), str(head_regime)
        budget_text = f"{frac:g} annotated images" if seg else f"label fraction {_frac(frac)}"
        if seg:
            md += _overlay_section(done, out, regime, frac)
            md += _seg_section(done, out, frac)
        else:
            curves: dict[str, Any] = {}
            for init in sorted({s["init"] for s in rows}):
                e = ens_by_key.get((init, regime, frac))
                if e and e.get("roc"):
                    curves[f"{init} (ensemble)"] = e["roc"]
                    continue
                runs = sorted((r for r in done if _key(r) == (init, regime, frac)), key=lambda r: r["seed"])
                if runs and runs[0].get("roc"):
                    curves[f"{init} (seed {runs[0]['seed']})"] = runs[0]["roc"]
            md += ["## ROC curves", "", f"Regime `{regime}`, label fraction {_frac(frac)}, test set.", "",
                   f"![ROC curves]({PLOTS[1]})", ""]
            plot_roc(curves, out / PLOTS[1], title=f"regime {regime}, labels {_frac(frac)}")

            head_rows = [s for s in rows if s["label_fraction"] == frac]
            md += ["## Six-metric radar", "",
                   f"Per init, label fraction {_frac(frac)}, one polygon per regime (mean over seeds).", "",
                   f"![radar]({PLOTS[2]})", ""]
            plot_radar(head_rows, out / PLOTS[2])

        head_runs = [r for r in done if budget(r) == frac]
        vname = f"validation {_LABELS[metric]}"
        md += ["## Learning curves and convergence", "",
               f"{vname[0].upper() + vname[1:]} and training loss per epoch (mean over seeds), {budget_text}. "
               f"Convergence speed = epochs until the {vname} first reaches 95% of its best value.", "",
               f"![learning curves]({PLOTS[3]})", "",
               f"| init | regime | {'images' if seg else 'labels'} | epochs to 95% of best val {_LABELS[metric]} "
               "| steps to 95% | seconds to 95% | best epoch | s/epoch (wall-clock) |",
               "|---|---|---|---|---|---|---|---|"]
        for s in rows:
            md.append(f"| {s['init']} | {s['regime']} | {_frac(s['label_fraction'])} | {_pm(s['epochs_to_95'], 1)} | "
                      f"{_pm(s['steps_to_95'], 0)} | {_pm(s['seconds_to_95'], 1)} | "
                      f"{_pm(s['best_epoch'], 1)} | {_fmt(s['epoch_s']['mean'], 2)} |")
        md.append("")
        plot_learning_curves(head_runs, out / PLOTS[3], val_key=val_key)

        reuse = reuse_rows(done, frac)
        if reuse:
            md += ["## Where the features are reused", "",
                   f"Per backbone stage ({budget_text}, mean over seeds): relative weight change "
                   "||w - w0|| / ||w0|| from the start of fine-tuning, and linear CKA between the stage's output "
                   "before and after fine-tuning on a fixed validation batch (1 = representation kept). A "
                   "transferred stage that barely moves and keeps CKA near 1 is reused; one that moves as much as "
                   "scratch's is relearned (Raghu et al. 2019).", "", "![feature reuse](reuse.png)", "",
                   "| init | regime | " + " | ".join(reuse[0]["stages"]) + " |",
                   "|---|---|" + "---|" * len(reuse[0]["stages"])]
            for r in reuse:
                md.append(f"| {r['init']} | {r['regime']} | " + " | ".join(
                    f"{w:.3f} / {c:.2f}" for w, c in zip(r["weight_change"], r["cka"], strict=True)) + " |")
            md += ["", "Cells: weight change / CKA.", ""]
            plot_reuse(reuse, out / "reuse.png")

        sweep = reuse_k_rows(rows, frac, metric)
        if any(r["k"] is not None for r in sweep):
            md += ["## Reuse the lower k stages", "",
                   f"`reinit:<k>` keeps the lowest k stages of the init and re-initialises the rest ({budget_text}; "
                   "`full` keeps every stage): where the curve flattens, the stages above add nothing the task "
                   "could not learn from scratch.", "", "![reuse lower k](reuse_k.png)", "",
                   f"| init | stages kept | test {_LABELS[metric]} | steps to 95% |", "|---|---|---|---|"]
            md += [f"| {r['init']} | {'full' if r['k'] is None else r['k']} | {_pm(r['metric'])} | "
                   f"{_pm(r['steps_to_95'], 0)} |" for r in sweep]
            md.append("")
            plot_reuse_k(sweep, out / "reuse_k.png", metric)

    if rows:
        md += cross_init_markdown(cross_init_ensembles(results, metric), seg=seg)
    if not seg:
        md += multitask_markdown(done)

    md += cross_dataset_markdown(cross_dataset_rows(evaluated, metric))
    md += ["## Unavailable arms", ""]
    if unavailable:
        md.append("These arms could not be measured and are **not** replaced by randomly initialised weights:")
        md.append("")
        seen = set()
        for arm in unavailable:
            key = (arm.get("init_label"), arm.get("reason"))
            if key in seen:
                continue
            seen.add(key)
            n = sum(1 for u in unavailable if (u.get("init_label"), u.get("reason")) == key)
            md.append(f"- **{arm.get('init_label')}** ({n} run(s)): {arm.get('reason')}")
    else:
        md.append("None: every requested init was available.")
    md.append("")
    if failed:
        md += ["## Failed runs", ""]
        for run in failed:
            md.append(f"- {run.get('init_label')} / {run.get('regime')} / {run.get('label_fraction')} / seed "
                      f"{run.get('seed')}: {run.get('reason', 'no reason recorded')}")
        md.append("")
    md += ["Files: `runs.csv` (one row per run, with bootstrap CIs of every metric), `summary.csv` "
           "(aggregates and ensembles)."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The answer: which init at which label budget, and how sure
# --------------------------------------------------------------------------------------------

LEVEL = 0.95
"""Confidence level of the gap's interval; the family-wise error rate of the "clear" verdicts is 1 - LEVEL."""

STATS_METHOD = (
    "For each label budget, the init to use and how sure that is:",
    "- *choice*: each init's regime (and learning rate) is the one with the best mean validation {name} over "
    "seeds, never test; the inits are ranked by the test {name} of that choice;",
    "- *gap*: winner - runner-up in mean test {name} over seeds; var = var_boot + var_seeds / n_seeds, var_boot "
    "from a paired bootstrap of the seed-averaged predictions over the same test {unit} for both arms, var_seeds "
    "the spread of the per-seed gaps (paired by seed; Welch when the arms ran different seeds); 95% CI = gap ± "
    "t(df) · sqrt(var), df = n_seeds - 1 (Welch-Satterthwaite unpaired; normal quantiles with one seed). Without "
    "saved predictions the test-set variance comes from each run's bootstrap CI, the arms taken as independent "
    "(conservative);",
    "- *verdict*: p-values Holm-adjusted over the label budgets; **clear**: the adjusted p < 0.05; **likely**: the "
    "unadjusted 95% CI excludes 0; else **not distinguishable**. DeLong p: a cross-check of the two AUCs of the "
    "seed-averaged probabilities (binary tasks).",
)
"""The lines that say how :func:`recommend` decides (``{name}``: the metric, ``{unit}``: cases or images)."""


def run_threshold(r: Result) -> float:
    """The threshold a segmentation run binarised its test maps at: the run's ``threshold`` (chosen on
    validation) when recorded as a number, else ``config.seg.threshold``, else 0.5."""
    if isinstance(r.get("threshold"), (int, float)):
        return float(r["threshold"])
    t = ((r.get("config") or {}).get("seg") or {}).get("threshold")
    return float(t) if isinstance(t, (int, float)) else 0.5


def _seed_metrics(runs: Sequence[Result], metric: str) -> dict[int, float]:
    out = {}
    for r in runs:
        v = r["metrics"]["test"].get(metric, math.nan)
        if v is not None and math.isfinite(v):
            out[int(r["seed"])] = float(v)
    return out


def _ci_var(runs: Sequence[Result], metric: str, level: float) -> float:
    """Test-sampling variance of one arm from its runs' percentile-bootstrap CIs: (mean half-width / z)^2. Not
    divided by the number of seeds: every seed is scored on the same test cases."""
    z = float(stats.t_interval(0.0, 1.0, math.inf, level)[1])
    halves = [(r["ci"][metric]["high"] - r["ci"][metric]["low"]) / 2 / z for r in runs
              if r.get("ci") and metric in r["ci"] and math.isfinite(r["ci"][metric]["high"] - r["ci"][metric]["low"])]
    return float(np.mean(halves)) ** 2 if halves else 0.0


def _arm_predictions(runs: Sequence[Result]) -> list[Predictions] | None:
    preds = []
    for r in runs:
        path = _predictions_path(r)
        pred = _load(path) if path is not None else None
        if pred is None:
            return None
        preds.append(pred)
    return preds


def compare_arms(runs_a: Sequence[Result], runs_b: Sequence[Result], metric: str, *, n_boot: int = 2000,
                 seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """The test-set comparison of two cells (each: the runs of one init's chosen configuration, one per seed).

    Gap of the seed means with :func:`medpretrain.stats.combine_with_seeds`; its test-sampling variance from
    :func:`medpretrain.stats.paired_bootstrap` of the seed-averaged predictions (``predictions.npz`` of every
    run, the same test cases in both arms; segmentation: per-image Dice of the averaged maps at the runs' mean
    threshold), else from the runs' bootstrap CIs (:func:`_ci_var`, arms independent). Classification AUC of a
    binary task adds :func:`medpretrain.stats.delong` on the seed-averaged probabilities as a cross-check.
    Returns the JSON-ready fields of a :func:`recommend` row."""
    ma, mb = _seed_metrics(runs_a, metric), _seed_metrics(runs_b, metric)
    paired = sorted(ma) == sorted(mb) and len(ma) > 1
    a = [ma[s] for s in sorted(ma)]
    b = [mb[s] for s in sorted(mb)]
    pa, pb = _arm_predictions(runs_a), _arm_predictions(runs_b)
    boot = dl = None
    usable = pa is not None and pb is not None and all(p.same_cases(pa[0]) for p in [*pa, *pb])
    if usable and metric in ("auc", "dice"):
        assert pa is not None and pb is not None
        ref = pa[0]
        if metric == "dice" and ref.masks is not None and ref.rois is not None:
            thr_a = float(np.mean([run_threshold(r) for r in runs_a]))
            thr_b = float(np.mean([run_threshold(r) for r in runs_b]))
            da = _dice_per_image(np.mean([p.probs for p in pa], axis=0), ref.masks, ref.rois, thr_a)
            db = _dice_per_image(np.mean([p.probs for p in pb], axis=0), ref.masks, ref.rois, thr_b)
            boot = stats.paired_bootstrap(da, db, None, "dice", n_boot=n_boot, seed=seed, level=level)
            unit = f"{len(da)} test images, per-image Dice"
        elif metric == "auc" and ref.labels is not None:
            avg_a, avg_b = np.mean([p.probs for p in pa], axis=0), np.mean([p.probs for p in pb], axis=0)
            try:
                boot = stats.paired_bootstrap(avg_a, avg_b, ref.labels, "auc", n_boot=n_boot, seed=seed, level=level)
            except ValueError:
                boot = None  # AUC undefined on every resample: fall back to the per-seed metrics
            unit = f"{len(ref.labels)} test cases"
            if boot is not None and np.asarray(ref.labels).ndim == 1 and np.isin(ref.labels, (0, 1)).all():
                try:
                    dl = stats.delong(avg_a, avg_b, ref.labels)
                except ValueError:
                    dl = None
    if boot is not None:
        est = stats.combine_with_seeds(boot.var, a, b, paired=paired, level=level)
        test = f"paired bootstrap ({boot.n_boot} resamples of the {unit}) of the seed-averaged predictions"
        kind = "paired bootstrap + seeds"
    else:
        est = stats.combine_with_seeds(_ci_var(runs_a, metric, level) + _ci_var(runs_b, metric, level), a, b,
                                       paired=paired, level=level)
        test = "per-seed test metrics (no usable predictions.npz); test-set variance from each run's bootstrap CI, " \
               "arms independent"
        kind = "per-seed metrics"
    spread = ("no seed spread measured (one seed, or equal per-seed gaps): normal quantiles" if math.isinf(est.df)
              else f"seed spread {'paired by seed' if paired else 'unpaired (Welch)'}, t with {est.df:.3g} df")
    return {
        "gap": est.gap, "ci": [est.low, est.high], "se": est.se, "df": est.df, "p_value": est.p_value,
        "var_test": est.var_test, "var_seed": est.var_seed, "paired_seeds": paired, "n_seeds": list(est.n_seeds),
        "test": f"{test}; {spread}", "test_kind": kind,
        "bootstrap": boot.to_dict() if boot is not None else None,
        "delong": dl.to_dict() if dl is not None else None,
    }


def _choose(cells: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The configuration of one init with the best mean validation score (ties: more seeds, then the regime
    label); never the test score."""
    def key(s: Mapping[str, Any]) -> tuple[float, int, str]:
        v = s["val"]["mean"]
        return (-(v if math.isfinite(v) else -math.inf), -s["n"], str(s["regime_label"]))
    return sorted(cells, key=key)[0]


def recommend(results: Sequence[Result | RunResult], metric: str | None = None, *, n_boot: int = 2000,
              seed: int = 0, level: float = LEVEL) -> list[dict[str, Any]]:
    """Per label budget: which init to use, chosen and judged as a reviewer would accept.

    1. Cells that fail the guard (:func:`failed_check`: AUC at or below chance, Dice at or below the better
       constant mask, undefined) are listed in ``failed_cells`` and take no part; nor do multi-task cells
       (their metric is the mean over their tasks; :func:`multitask_markdown` compares them).
    2. Each init's configuration (regime, and learning rate when the runs hold several) is the one with the
       best mean over seeds of ``metrics["val_best"][metric]`` (validation, never test; ``alternatives`` lists the
       others with their validation means).
    3. The inits are ranked by the mean test ``metric`` of their chosen cell; the winner and the runner-up are
       compared with :func:`compare_arms` (paired bootstrap + seed spread with t quantiles).
    4. The p-values of the budgets' comparisons are Holm-adjusted (:func:`medpretrain.stats.holm`).
       ``verdict``: ``clear`` (adjusted p < 1 - ``level``), ``likely`` (the unadjusted CI excludes 0),
       ``not distinguishable``, ``only one init`` or ``no valid cell``.

    Each row: ``budget``, ``metric``, ``selection`` (``"validation"``), ``ranking`` (per init: ``init, regime,
    lr, regime_label, mean, std, n`` (test, over seeds), ``val_mean, val_n, seeds, alternatives``), ``winner``,
    ``runner_up``, ``gap`` (= ``margin``), ``ci`` [low, high], ``se`` (= ``uncertainty``), ``df``, ``p_value``,
    ``p_holm``, ``test`` (what was computed), ``test_kind``, ``var_test``, ``var_seed``, ``paired_seeds``,
    ``n_seeds``, ``bootstrap`` (the :class:`~medpretrain.stats.BootstrapGap` of the seed-averaged predictions or
    ``None``), ``delong`` (:class:`~medpretrain.stats.DeLongResult` or ``None``), ``verdict``, ``single_seed``
    (an arm of the two has one seed), ``failed_cells`` (``init, regime, regime_label, lr, mean, n, chance,
    chance_kind, n_below_chance, cause``), ``unavailable`` (inits that could not be measured).
    """
    results = as_mappings(results)
    metric = metric or headline_metric(report_task(results))
    rows = summarize(results, headline=metric)
    runs_of = _cells(results)  # keyed like the rows: (init, regime, budget, lr or -1)
    unavailable = sorted({str(r.get("init_label")) for r in results if r.get("status") == "unavailable"})
    out: list[dict[str, Any]] = []
    for b in sorted({s["label_fraction"] for s in rows}):
        here = [s for s in rows if s["label_fraction"] == b]
        failed = [{"init": s["init"], "regime": s["regime"], "regime_label": s["regime_label"], "lr": s["lr"],
                   "mean": s["metrics"][metric]["mean"], "n": s["n"], "chance": s["chance"],
                   "chance_kind": s["chance_kind"], "n_below_chance": s["n_below_chance"], "cause": s["failed"]}
                  for s in here if s["failed"]]
        # Multi-task cells score the mean over their tasks, not the headline task: compared in their own
        # section (multitask_markdown), never ranked against single-task cells.
        ok = [s for s in here if not s["failed"] and not s.get("multitask")]
        ranking = []
        for init in sorted({s["init"] for s in ok}):
            mine = [s for s in ok if s["init"] == init]
            c = _choose(mine)
            agg = c["metrics"][metric]
            ranking.append({
                "init": init, "regime": c["regime"], "lr": c["lr"], "regime_label": c["regime_label"],
                "mean": agg["mean"], "std": agg["std"], "n": agg["n"], "val_mean": c["val"]["mean"],
                "val_n": c["val"]["n"], "seeds": c["seeds"],
                "alternatives": [{"regime_label": s["regime_label"], "val_mean": s["val"]["mean"]}
                                 for s in mine if s is not c],
            })
        ranking.sort(key=lambda a: -a["mean"])
        row: dict[str, Any] = {
            "budget": b, "metric": metric, "selection": "validation", "ranking": ranking,
            "winner": ranking[0] if ranking else None, "runner_up": None, "gap": math.nan, "margin": math.nan,
            "ci": [math.nan, math.nan], "se": math.nan, "uncertainty": math.nan, "df": math.nan,
            "p_value": math.nan, "p_holm": math.nan, "test": "", "test_kind": "", "bootstrap": None, "delong": None,
            "verdict": "only one init" if ranking else "no valid cell",
            "single_seed": bool(ranking) and ranking[0]["n"] < 2, "failed_cells": failed,
            "unavailable": [u for u in unavailable if u not in {a["init"] for a in ranking}],
        }
        if len(ranking) > 1:
            w, r = ranking[0], ranking[1]
            key_w = (w["init"], w["regime"], b, -1.0 if w["lr"] is None else w["lr"])
            key_r = (r["init"], r["regime"], b, -1.0 if r["lr"] is None else r["lr"])
            cmp = compare_arms(runs_of[key_w], runs_of[key_r], metric, n_boot=n_boot, seed=seed, level=level)
            row.update(cmp, runner_up=r, margin=cmp["gap"], uncertainty=cmp["se"],
                       single_seed=w["n"] < 2 or r["n"] < 2)
        out.append(row)
    tested = [row for row in out if math.isfinite(row["p_value"])]
    adjusted = stats.holm([row["p_value"] for row in tested], alpha=1 - level).adjusted
    for row, p in zip(tested, adjusted, strict=True):
        lo, hi = row["ci"]
        row["p_holm"] = float(p)
        row["holm_m"] = len(tested)
        row["verdict"] = ("clear" if p < 1 - level else "likely" if lo > 0 or hi < 0 else "not distinguishable")
    return out


def cross_init_ensembles(results: Sequence[Result | RunResult], metric: str | None = None, *,
                         rows: Sequence[Mapping[str, Any]] | None = None, n_boot: int = 2000, seed: int = 0,
                         level: float = LEVEL) -> list[dict[str, Any]]:
    """Per label budget, the ensemble of the initialisations: each ranked init's chosen cell (:func:`recommend`:
    configuration chosen on validation) is averaged over its seeds, then the members are averaged with equal
    weight, and the ensemble is compared with each member by a paired bootstrap over the same test cases
    (segmentation: per-image Dice of the averaged maps at the members' mean threshold). Budgets with fewer than
    two members, or members without ``predictions.npz`` on the same cases, are skipped.

    Each row: ``budget``, ``metric``, ``members`` (inits), ``score`` (the ensemble's test metric) and ``vs``:
    per member ``init, regime_label, score, gap`` (ensemble minus member), ``ci``, ``p_value``."""
    results = as_mappings(results)
    metric = metric or headline_metric(report_task(results))
    rows = recommend(results, metric, n_boot=n_boot, seed=seed, level=level) if rows is None else rows
    cells = _cells(results)
    out = []
    for row in rows:
        b, members, preds, runs_of = row["budget"], [], [], {}
        for a in row["ranking"]:
            runs = cells.get((a["init"], a["regime"], b, -1.0 if a["lr"] is None else a["lr"]), [])
            p = _arm_predictions(runs) if runs else None
            if p is None:
                continue
            members.append(a)
            preds.append(p)
            runs_of[a["init"]] = runs
        if len(members) < 2 or not all(q.same_cases(preds[0][0]) for p in preds for q in p):
            continue
        ref = preds[0][0]
        avg = [np.mean([q.probs for q in p], axis=0) for p in preds]
        ens = np.mean(avg, axis=0)
        if metric == "dice" and ref.masks is not None and ref.rois is not None:
            thr = float(np.mean([run_threshold(r) for runs in runs_of.values() for r in runs]))
            per = [_dice_per_image(x, ref.masks, ref.rois, thr) for x in [ens, *avg]]
            score, member_scores = float(per[0].mean()), [float(x.mean()) for x in per[1:]]
            gaps = [stats.paired_bootstrap(per[0], x, None, "dice", n_boot=n_boot, seed=seed, level=level)
                    for x in per[1:]]
        elif metric == "auc" and ref.labels is not None:
            score = float(stats.auc_score(ens, ref.labels))
            member_scores = [float(stats.auc_score(x, ref.labels)) for x in avg]
            gaps = [stats.paired_bootstrap(ens, x, ref.labels, "auc", n_boot=n_boot, seed=seed, level=level)
                    for x in avg]
        else:
            continue
        out.append({"budget": b, "metric": metric, "members": [a["init"] for a in members], "score": score,
                    "vs": [{"init": a["init"], "regime_label": a["regime_label"], "score": ms, "gap": g.gap,
                            "ci": [g.low, g.high], "p_value": g.p_value}
                           for a, ms, g in zip(members, member_scores, gaps, strict=True)]})
    return out


# --------------------------------------------------------------------------------------------
# Multi-task runs: each task's test metrics, next to the task trained alone
# --------------------------------------------------------------------------------------------


def multitask_rows(results: Sequence[Result | RunResult]) -> list[dict[str, Any]]:
    """One row per task of every multi-task cell (complete runs with two or more ``tasks``; cell = init, regime,
    label budget, task set): the task's kind, weight and labels, mean / sd / n over seeds of each test metric
    (:func:`medpretrain.metrics.aggregate`), the per-seed bootstrap CIs of its AUC, and ``alone``: the test AUC
    (mean / sd / n) of the same task trained alone (runs whose only task has the same name, kind and labels, same
    init, regime and budget; ``None`` without such runs)."""
    done = [r for r in as_mappings(results) if r.get("status") == "complete" and r.get("tasks")]
    cells: dict[tuple[str, str, float], list[Result]] = defaultdict(list)
    for r in done:
        if len(r["tasks"]) > 1:
            cells[(str(r["init_label"]), run_regime(r), budget(r))].append(r)

    def same_task(t: Mapping[str, Any], u: Mapping[str, Any]) -> bool:
        return t.get("kind") == u.get("kind") and t.get("labels") == u.get("labels")

    rows = []
    for (init, regime, frac), runs in sorted(cells.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        for name, spec in runs[0]["tasks"].items():
            per_seed = [r["tasks"][name] for r in runs if name in r["tasks"]]
            alone = [r["tasks"][name]["metrics"]["test"] for r in done
                     if list(r["tasks"]) == [name] and same_task(r["tasks"][name], spec)
                     and (str(r["init_label"]), str(r["regime"]), budget(r)) == (init, runs[0]["regime"], frac)]
            rows.append({
                "init": init, "regime": regime, "label_fraction": frac, "task": name, "kind": spec.get("kind"),
                "weight": spec.get("weight"), "labels": spec.get("labels"), "n": len(per_seed),
                "metrics": aggregate([t["metrics"]["test"] for t in per_seed], METRICS),
                "auc_ci": [(t["ci"]["auc"]["low"], t["ci"]["auc"]["high"]) for t in per_seed if t.get("ci")],
                "alone": aggregate(alone, ["auc"])["auc"] if alone else None,
            })
    return rows


def multitask_markdown(results: Sequence[Result | RunResult]) -> list[str]:
    """The "Multi-task runs" section (:func:`multitask_rows`); empty without multi-task runs."""
    rows = multitask_rows(results)
    if not rows:
        return []
    md = ["## Multi-task runs: per-task test metrics", "",
          "One backbone, a head per task, trained jointly (loss: the weighted sum of the task losses; checkpoint "
          "selected on the weighted mean of the tasks' validation AUCs; the cell's row in the comparison is that "
          "weighted mean of each metric). Per task: mean ± sd over seeds of its test metrics at its own threshold "
          "chosen on validation, the per-seed 95% bootstrap CIs of its AUC, and the test AUC of the same task trained "
          "alone (same init, regime and label budget) where such runs exist.", "",
          "| init | regime | labels | task | kind | weight | " + " | ".join(_LABELS[m] for m in METRICS)
          + " | AUC 95% CI | trained alone: AUC |", "|" + "---|" * (len(METRICS) + 8)]
    for r in rows:
        cis = "; ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in r["auc_ci"])
        md.append(f"| {r['init']} | {r['regime']} | {_frac(r['label_fraction'])} | {r['task']} | {r['kind']} | "
                  f"{r['weight']:g} | " + " | ".join(_pm(r["metrics"][m]) for m in METRICS)
                  + f" | {cis} | {_pm(r['alone']) if r['alone'] else '-'} |")
    md.append("")
    return md


def cross_init_markdown(rows: Sequence[Mapping[str, Any]], seg: bool = False) -> list[str]:
    """The table of :func:`cross_init_ensembles`."""
    if not rows:
        return []
    name = _LABELS[rows[0]["metric"]]
    md = ["## Ensembles across initialisations", "",
          f"Per budget, every init's chosen configuration (seed-averaged predictions) averaged with equal weight; "
          f"ensemble minus member test {name}, paired bootstrap 95% CI over the same test "
          f"{'images' if seg else 'cases'} (member predictions are seed averages, so this is the test-set "
          "part of the uncertainty only).", "",
          f"| {'annotated images' if seg else 'label fraction'} | ensemble of | ensemble {name} | member | "
          f"member {name} | gap [95% CI] | p |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = ("all" if r["budget"] == 0 else f"{r['budget']:g}") if seg else f"{r['budget']:g}"
        for v in r["vs"]:
            lo, hi = v["ci"]
            md.append(f"| {b} | {', '.join(r['members'])} | {r['score']:.3f} | {v['init']} ({v['regime_label']}) | "
                      f"{v['score']:.3f} | {v['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {_p(v['p_value'])} |")
    md.append("")
    return md


def _p(x: Any) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{x:.2g}" if x >= 0.001 else "<0.001"


def recommendation_markdown(rows: Sequence[Mapping[str, Any]], seg: bool = False) -> list[str]:
    """The recommendation table of :func:`recommend`, how it was computed, and the failed cells left out
    (``seg``: budgets are numbers of annotated images, 0 = all). Rows of an older ``experiment.json`` (gap ±
    uncertainty, no CI) are shown as they were computed."""
    if not rows:
        return ["No complete runs: nothing to recommend yet."]
    name = _LABELS[rows[0]["metric"]]
    unit = "images (per-image Dice)" if seg else "cases"
    md = [*(line.format(name=name, unit=unit) for line in STATS_METHOD), "",
          f"| {'annotated images' if seg else 'label fraction'} | use | test {name} | runner-up | gap [95% CI] "
          "| p (Holm) | DeLong p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, ru = r.get("winner"), r.get("runner_up")
        budget_text = ("all" if r["budget"] == 0 else f"{r['budget']:g}") if seg else f"{r['budget']:g}"
        if w is None:
            md.append(f"| {budget_text} | - | - | - | - | - | - | {r['verdict']} |")
            continue
        win = f"**{w['init']}** ({w.get('regime_label', w['regime'])})"
        score = _pm({"mean": w["mean"], "std": w["std"], "n": w["n"]}) + f" (n={w['n']})"
        if ru is None:
            md.append(f"| {budget_text} | {win} | {score} | - | - | - | - | {r['verdict']} |")
            continue
        verdict = r["verdict"] + (" (single seed)" if r["single_seed"] else "")
        if "ci" in r:
            lo, hi = r["ci"]
            gap = f"{r['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            p = f"{_p(r['p_value'])} ({_p(r.get('p_holm'))})"
            dl = _p(r["delong"]["p_value"]) if r.get("delong") else "-"
        else:  # an experiment.json written before the CIs
            gap, p, dl = f"{r['margin']:+.3f} ± {r['uncertainty']:.3f}", "-", "-"
        md.append(f"| {budget_text} | {win} | {score} | {ru['init']} ({ru.get('regime_label', ru['regime'])}) "
                  f"{ru['mean']:.3f} | {gap} | {p} | {dl} | {verdict} |")
    tests = sorted({r["test"] for r in rows if r.get("test")})
    if tests:
        md += ["", "Test used: " + "; ".join(f"*{t}*" for t in tests) + "."]
    failed = [(r["budget"], f) for r in rows for f in r.get("failed_cells", [])]
    if failed:
        md += ["", "Failed cells, left out of the recommendation (not findings):"]
        for b, f in failed:
            bt = ("all" if b == 0 else f"{b:g}") if seg else f"{b:g}"
            md.append(f"- {bt}: {f['init']} / {f['regime_label']} (n={f['n']}): {f['cause']}.")
    missing = sorted({u for r in rows for u in r["unavailable"]})
    if missing:
        md += ["", f"Not measured (unavailable, never replaced by random weights): {', '.join(missing)}; "
                   "see the unavailable arms in the full report."]
    return md


def efficiency_markdown(rows: Sequence[Mapping[str, Any]], metric: str, seg: bool = False) -> list[str]:
    """Label-efficiency table from :func:`summarize` rows: one line per (init, regime), test ``metric``
    mean ± sd over seeds at each budget; a failed cell (:func:`failed_check`) is marked ✗ and explained below."""
    budgets = sorted({float(s["label_fraction"]) for s in rows})
    head = [("all" if b == 0 else f"{b:g}") if seg else _frac(b) for b in budgets]
    md = [f"| init | regime | {' | '.join(head)} |", "|---|---|" + "---|" * len(budgets)]
    notes = []
    for init, regime in sorted({(s["init"], s.get("regime_label", s["regime"])) for s in rows}):
        cells = []
        for b, bt in zip(budgets, head, strict=True):
            match = [s for s in rows if (s["init"], s.get("regime_label", s["regime"]), float(s["label_fraction"]))
                     == (init, regime, b)]
            if not match:
                cells.append("-")
                continue
            s = match[0]
            text = _pm(s["metrics"][metric]) + f" (n={s['metrics'][metric]['n']})"
            if s.get("failed"):
                text += " ✗"
                notes.append(f"- ✗ {init} / {regime} at {bt}: {s['failed']}.")
            cells.append(text)
        md.append(f"| {init} | {regime} | " + " | ".join(cells) + " |")
    if notes:
        md += ["", "✗ failed cell, not a finding:", *notes]
    return md
