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
no ROC / radar, and the prediction overlays of the headline runs copied next to the report.
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

from medpretrain.metrics import METRIC_LABELS, METRICS, aggregate, metric_names
from medpretrain.results import RunResult, headline_metric
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


def _key(r: Result) -> tuple[str, str, float]:
    return (str(r["init_label"]), str(r["regime"]), budget(r))


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


def summarize(results: Sequence[Result], headline: str = "auc") -> list[dict[str, Any]]:
    """One row per (init, regime, label budget) over the completed runs: mean/sd of every test metric,
    epochs to 95% of the best validation score, seconds per epoch, and the per-seed bootstrap CIs of the
    ``headline`` metric (key ``auc_ci`` whatever the metric, for the table code)."""
    metrics = _metrics_of(results)
    groups: dict[tuple[str, str, float], list[Result]] = defaultdict(list)
    for r in results:
        if r.get("status") == "complete":
            groups[_key(r)].append(r)
    rows = []
    for (init, regime, frac), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        agg = aggregate([r["metrics"]["test"] for r in runs], metrics)
        conv = aggregate([{"e95": r.get("epochs_to_95") or math.nan, "s": r["timing"]["mean_epoch_s"],
                           "best": r.get("best_epoch") or math.nan} for r in runs])
        rows.append({
            "kind": "single", "init": init, "regime": regime, "label_fraction": frac,
            "seeds": [r["seed"] for r in runs], "n": len(runs), "metrics": agg,
            "auc_ci": [(r["ci"][headline]["low"], r["ci"][headline]["high"]) for r in runs if r.get("ci")],
            "epochs_to_95": conv["e95"], "epoch_s": conv["s"], "best_epoch": conv["best"],
            "train_size": runs[0]["data"].get("train_size"),
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
        row.update(epochs_to_95_mean=s["epochs_to_95"]["mean"], epoch_s_mean=s["epoch_s"]["mean"])
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
    regimes = sorted({r["regime"] for r in done}) or ["-"]
    inits = sorted({r["init_label"] for r in done})
    colors = _colors(inits)
    fig, axes = plt.subplots(2, len(regimes), figsize=(4.5 * len(regimes), 6), squeeze=False)
    for j, regime in enumerate(regimes):
        for init in inits:
            runs = [r for r in done if r["regime"] == regime and r["init_label"] == init]
            if not runs:
                continue
            for i, key in enumerate((val_key, "train_loss")):
                curves = [[h[key] for h in r["history"]] for r in runs]
                length = min(len(c) for c in curves)
                mean = np.nanmean(np.asarray([c[:length] for c in curves], dtype=float), axis=0)
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
# The report
# ------------------------------------------------------------------------------------------------


def _headline(results: Sequence[Result]) -> tuple[float | None, str | None]:
    done = [r for r in results if r.get("status") == "complete"]
    if not done:
        return None, None
    frac = max(budget(r) for r in done)
    regimes = sorted({r["regime"] for r in done if budget(r) == frac})
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
    done = [r for r in results if r.get("status") == "complete"]
    unavailable = [r for r in results if r.get("status") == "unavailable"]
    failed = [r for r in results if r.get("status") not in ("complete", "unavailable")]

    atomic_write_text(out / "runs.csv", _runs_csv(results, headline=metric))
    atomic_write_text(out / "summary.csv", _summary_csv(rows, ensembles, metrics, budget_name))

    md: list[str] = [f"# {title}", ""]
    md.append(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(results)} run(s): "
              f"{len(done)} complete, {len(unavailable)} unavailable, {len(failed)} failed.")
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

    md += ["## Comparison (test set)", "",
           f"Mean ± sample sd over seeds; per-seed 95% percentile-bootstrap CIs of the test {_LABELS[metric]}; "
           + ("ensemble rows average the seeds' test probability maps per pixel (saved in 1/65535 steps) and "
              "score them like one run (CI from the bootstrap over test images)" if seg
              else "ensemble rows average the test probabilities of the seeds of one init (CI from the bootstrap "
              "of that ensemble)") + ".",
           "", f"| init | regime | {'images' if seg else 'labels'} | model | "
           + " | ".join(_LABELS[m] for m in metrics) + f" | {_LABELS[metric]} 95% CI | epochs to 95% | s/epoch |",
           "|" + "---|" * (len(metrics) + 7)]
    ens_by_key = {(e["init"], e["regime"], float(e["label_fraction"])): e for e in ensembles}
    for s in rows:
        cis = "; ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in s["auc_ci"])
        md.append(f"| {s['init']} | {s['regime']} | {_frac(s['label_fraction'])} ({s['train_size']}) | "
                  f"single (n={s['n']}) | " + " | ".join(_pm(s["metrics"][m]) for m in metrics)
                  + f" | {cis} | {_pm(s['epochs_to_95'], 1)} | {_fmt(s['epoch_s']['mean'], 1)} |")
        e = ens_by_key.get((s["init"], s["regime"], s["label_fraction"]))
        if e:
            md.append(f"| {s['init']} | {s['regime']} | {_frac(s['label_fraction'])} | ensemble of {e['n']} | "
                      + " | ".join(_fmt(e["metrics"][m]) for m in metrics)
                      + f" | [{e['ci'][metric]['low']:.3f}, {e['ci'][metric]['high']:.3f}] | | |")
    md.append("")

    if rows:
        fracs = sorted({s["label_fraction"] for s in rows})
        md += ["## Label efficiency", "",
               f"Test {_LABELS[metric]} (mean ± sd over seeds) against "
               + ("the number of annotated training images (seeded draws)." if seg
                  else "the fraction of training labels (stratified, seeded subsets)."), "",
               "| init | regime | " + " | ".join(_frac(f) for f in fracs) + " |",
               "|---|---|" + "---|" * len(fracs)]
        for init, regime in sorted({(s["init"], s["regime"]) for s in rows}):
            cells = []
            for f in fracs:
                match = [s for s in rows if (s["init"], s["regime"], s["label_fraction"]) == (init, regime, f)]
                cells.append(_pm(match[0]["metrics"][metric]) if match else "-")
            md.append(f"| {init} | {regime} | " + " | ".join(cells) + " |")
        md += ["", f"![label efficiency]({PLOTS[0]})", ""]
        plot_label_efficiency(rows, out / PLOTS[0], metric,
                              xlabel="annotated training images" if seg else "label fraction")

        head_frac, head_regime = _headline(results)
        frac, regime = float(head_frac or 1.0), str(head_regime)
        budget_text = f"{frac:g} annotated images" if seg else f"label fraction {_frac(frac)}"
        if seg:
            md += _overlay_section(done, out, regime, frac)
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
               "| best epoch | s/epoch (wall-clock) |",
               "|---|---|---|---|---|---|"]
        for s in rows:
            md.append(f"| {s['init']} | {s['regime']} | {_frac(s['label_fraction'])} | {_pm(s['epochs_to_95'], 1)} | "
                      f"{_pm(s['best_epoch'], 1)} | {_fmt(s['epoch_s']['mean'], 2)} |")
        md.append("")
        plot_learning_curves(head_runs, out / PLOTS[3], val_key=val_key)

    md += ["## Unavailable arms", ""]
    if unavailable:
        md.append("These arms could not be measured and are **not** replaced by randomly initialised weights:")
        md.append("")
        seen = set()
        for r in unavailable:
            key = (r.get("init_label"), r.get("reason"))
            if key in seen:
                continue
            seen.add(key)
            n = sum(1 for u in unavailable if (u.get("init_label"), u.get("reason")) == key)
            md.append(f"- **{r.get('init_label')}** ({n} run(s)): {r.get('reason')}")
    else:
        md.append("None: every requested init was available.")
    md.append("")
    if failed:
        md += ["## Failed runs", ""]
        for r in failed:
            md.append(f"- {r.get('init_label')} / {r.get('regime')} / {r.get('label_fraction')} / seed "
                      f"{r.get('seed')}: {r.get('reason', 'no reason recorded')}")
        md.append("")
    md += ["Files: `runs.csv` (one row per run, with bootstrap CIs of every metric), `summary.csv` "
           "(aggregates and ensembles)."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The answer: which init at which label budget, and how sure
# --------------------------------------------------------------------------------------------


def _arm_se(row: Mapping[str, Any], metric: str) -> float:
    """Standard error of an arm's mean test metric: seed spread (sd / sqrt(n)) combined with test-set
    sampling (the mean per-seed 95% bootstrap half-width / 1.96, averaged over seeds, so / sqrt(n))."""
    agg = row["metrics"][metric]
    seed_var = agg["std"] ** 2 / agg["n"] if agg["n"] > 1 and math.isfinite(agg["std"]) else 0.0
    halves = [(hi - lo) / 2 / 1.96 for lo, hi in row["auc_ci"] if math.isfinite(lo) and math.isfinite(hi)]
    test_var = (float(np.mean(halves)) ** 2 / len(halves)) if halves else 0.0
    return math.sqrt(seed_var + test_var)


def recommend(results: Sequence[Result | RunResult], metric: str | None = None) -> list[dict[str, Any]]:
    """Per label budget, the inits ranked by their best regime's mean test ``metric`` (AUC, or Dice for
    segmentation), and a verdict on the gap between the best and the runner-up init.

    Each row: ``budget``, ``metric``, ``ranking`` (``init, regime, mean, std, n, se`` best first),
    ``winner``, ``runner_up``, ``margin`` (winner mean - runner-up mean), ``uncertainty``
    (sqrt(se_w^2 + se_r^2)), ``verdict``: ``clear`` (margin > 2 x uncertainty), ``likely`` (> 1 x),
    ``not distinguishable``, or ``only one init`` ; ``single_seed`` when an arm of the two has one seed
    (its seed-to-seed spread is then not measured and the uncertainty counts test-set sampling only),
    ``unavailable``: inits that could not be measured (e.g. ImageNet weights missing).
    """
    results = as_mappings(results)
    metric = metric or headline_metric(report_task(results))
    rows = summarize(results, headline=metric)
    unavailable = sorted({str(r.get("init_label")) for r in results if r.get("status") == "unavailable"})
    out = []
    for b in sorted({s["label_fraction"] for s in rows}):
        best: dict[str, dict[str, Any]] = {}
        for s in rows:
            if s["label_fraction"] != b or not math.isfinite(s["metrics"][metric]["mean"]):
                continue
            arm = {"init": s["init"], "regime": s["regime"], "mean": s["metrics"][metric]["mean"],
                   "std": s["metrics"][metric]["std"], "n": s["metrics"][metric]["n"], "se": _arm_se(s, metric)}
            if s["init"] not in best or arm["mean"] > best[s["init"]]["mean"]:
                best[s["init"]] = arm
        ranking = sorted(best.values(), key=lambda a: -a["mean"])
        if not ranking:
            continue
        row: dict[str, Any] = {"budget": b, "metric": metric, "ranking": ranking, "winner": ranking[0],
                               "runner_up": None, "margin": math.nan, "uncertainty": math.nan,
                               "verdict": "only one init", "single_seed": ranking[0]["n"] < 2,
                               "unavailable": [u for u in unavailable if u not in best]}
        if len(ranking) > 1:
            w, r = ranking[0], ranking[1]
            margin, unc = w["mean"] - r["mean"], math.sqrt(w["se"] ** 2 + r["se"] ** 2)
            verdict = ("clear" if margin > 2 * unc else "likely" if margin > unc else "not distinguishable")
            row.update(runner_up=r, margin=margin, uncertainty=unc, verdict=verdict,
                       single_seed=w["n"] < 2 or r["n"] < 2)
        out.append(row)
    return out


def recommendation_markdown(rows: Sequence[Mapping[str, Any]], seg: bool = False) -> list[str]:
    """The recommendation table of :func:`recommend` with a line on how to read it (``seg``: budgets are
    numbers of annotated images, 0 = all)."""
    if not rows:
        return ["No complete runs: nothing to recommend yet."]
    name = _LABELS[rows[0]["metric"]]
    md = [f"For each label budget: the init whose best regime has the highest mean test {name} over seeds, the "
          f"runner-up init, and the gap with its uncertainty (seed spread and test-set bootstrap combined; "
          f"*clear*: gap > 2x uncertainty, *likely*: > 1x, else *not distinguishable*).", "",
          f"| {'annotated images' if seg else 'label fraction'} | use | test {name} | runner-up | gap ± uncertainty "
          "| verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        w, ru = r["winner"], r["runner_up"]
        budget_text = ("all" if r["budget"] == 0 else f"{r['budget']:g}") if seg else f"{r['budget']:g}"
        win = f"**{w['init']}** ({w['regime']})"
        score = _pm({"mean": w["mean"], "std": w["std"], "n": w["n"]}) + f" (n={w['n']})"
        if ru is None:
            md.append(f"| {budget_text} | {win} | {score} | - | - | {r['verdict']} |")
            continue
        verdict = r["verdict"] + (" (single seed)" if r["single_seed"] else "")
        md.append(f"| {budget_text} | {win} | {score} | {ru['init']} ({ru['regime']}) {ru['mean']:.3f} | "
                  f"{r['margin']:+.3f} ± {r['uncertainty']:.3f} | {verdict} |")
    missing = sorted({u for r in rows for u in r["unavailable"]})
    if missing:
        md += ["", f"Not measured (unavailable, never replaced by random weights): {', '.join(missing)}; "
                   "see the unavailable arms in the full report."]
    return md


def efficiency_markdown(rows: Sequence[Mapping[str, Any]], metric: str, seg: bool = False) -> list[str]:
    """Label-efficiency table from :func:`summarize` rows: one line per (init, regime), test ``metric``
    mean ± sd over seeds at each budget."""
    budgets = sorted({float(s["label_fraction"]) for s in rows})
    head = [("all" if b == 0 else f"{b:g}") if seg else _frac(b) for b in budgets]
    md = [f"| init | regime | {' | '.join(head)} |", "|---|---|" + "---|" * len(budgets)]
    for init, regime in sorted({(s["init"], s["regime"]) for s in rows}):
        cells = []
        for b in budgets:
            match = [s for s in rows if (s["init"], s["regime"], float(s["label_fraction"])) == (init, regime, b)]
            cells.append(_pm(match[0]["metrics"][metric]) + f" (n={match[0]['metrics'][metric]['n']})"
                         if match else "-")
        md.append(f"| {init} | {regime} | " + " | ".join(cells) + " |")
    return md
