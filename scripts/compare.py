"""Run (or collect) a grid of fine-tuning runs and write one comparison report.

    python scripts/compare.py --config configs/compare.yaml
    python scripts/compare.py --config configs/compare.yaml collect_only=true     # report from what exists
    python scripts/compare.py inits='[scratch, selfsup, imagenet]' seeds='[0, 1, 2]' name=pneumonia

The grid is ``inits x regimes x label_fractions x seeds``; for a segmentation base config
(``task: segmentation``, e.g. ``configs/compare_drive.yaml``) it is ``inits x regimes x n_train_images x seeds``
with Dice as the headline metric. Each cell is one ``finetune/run.py`` run
(launched as ``accelerate launch finetune/run.py ...``, or in this process with ``launcher=inprocess``)
writing to ``<runs_dir>/finetune/<task>/<init>/<regime>/<fraction>/seed<k>``. A cell whose
``results.json`` is complete and carries the same config hash is skipped, so an interrupted grid
continues where it stopped. Unavailable arms (ImageNet weights missing, no pretraining export) are
shown as such in the report and are never replaced by random weights.

Per (init, regime, fraction) an ensemble row averages the test probabilities of the seeds
(``predictions.npz`` of each run) and scores them with the same metrics and bootstrap; for segmentation the
seeds' probability maps are averaged per pixel and scored per image inside the roi (:func:`seg_ensemble`).
The report goes to ``<runs_dir>/reports/<name>/`` (:func:`medpretrain.report.build_report`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "finetune"))

import run as finetune_run  # noqa: E402  (finetune/run.py)
from accelerate import PartialState  # noqa: E402

from medpretrain.config import load_config  # noqa: E402
from medpretrain.metrics import bootstrap_ci, classification_metrics, roc_curves  # noqa: E402
from medpretrain.report import build_report  # noqa: E402
from medpretrain.metrics import bootstrap_images, mean_metrics, per_image_metrics  # noqa: E402
from medpretrain.results import load_predictions  # noqa: E402

LOCAL_SPLIT_NOTES = {
    "pneumoniamnist": "PneumoniaMNIST: the local train split has 3882 images (388 normal / 3494 pneumonia), "
                      "smaller than the official MedMNIST v2 split (4708: 1214 / 3494); val and test are official. "
                      "Compare with published numbers accordingly.",
    "busi": "BUSI has no official split: a stratified, seeded train/val/test split is used (data.split_seed).",
}


@dataclass
class CompareConfig:
    base_config: str = "configs/finetune.yaml"
    """The fine-tuning config every cell starts from (``finetune/run.py --config``)."""
    inits: list[str] = field(default_factory=lambda: ["scratch", "selfsup", "imagenet"])
    """Init names (``finetune/run.py init=``), or ``<label>=<checkpoint path>`` to name a checkpoint in the report."""
    regimes: list[str] = field(default_factory=lambda: ["linear", "full"])
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    n_train_images: list[int] = field(default_factory=lambda: [2, 5, 0])
    """Segmentation only: label budgets as numbers of annotated training images (0 = all)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides passed to every run (e.g. ``optim.epochs=5``)."""
    runs_dir: str = "runs"
    name: str = "default"
    """Report folder: ``<runs_dir>/reports/<name>``."""
    title: str = "Initialisation comparison"
    launcher: Literal["accelerate", "torchrun", "inprocess"] = "accelerate"
    launch_args: list[str] = field(default_factory=lambda: ["--num_processes", "1"])
    """Arguments for ``accelerate launch`` (e.g. ``[--config_file, configs/accelerate/multi_gpu.yaml]``) or
    ``torchrun`` (e.g. ``[--nproc_per_node, 2]``: several CPU processes)."""
    collect_only: bool = False
    """Do not run anything: report on the results that exist."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the ensemble rows (runs use their own config's ``n_bootstrap``)."""
    notes: list[str] = field(default_factory=list)


def base_task(cfg: CompareConfig) -> str:
    """``classification`` or ``segmentation``: the task of the base config with the overrides."""
    return load_config(finetune_run.FinetuneConfig, ["--config", cfg.base_config, *cfg.overrides]).task


def cell_argv(cfg: CompareConfig, init: str, regime: str, fraction: float, seed: int,
              task: str = "classification") -> list[str]:
    budget = f"seg.n_train_images={int(fraction)}" if task == "segmentation" else f"data.label_fraction={fraction}"
    label, sep, path = init.partition("=")
    named = [f"init={path}", f"init_name={label}"] if sep else [f"init={init}"]
    return ["--config", cfg.base_config, *named, f"regime={regime}", budget,
            f"seed={seed}", f"runs_dir={cfg.runs_dir}", *cfg.overrides]


def grid(cfg: CompareConfig) -> list[list[str]]:
    task = base_task(cfg)
    budgets: list[float] = [float(n) for n in cfg.n_train_images] if task == "segmentation" else cfg.label_fractions
    return [cell_argv(cfg, i, r, f, s, task) for i in cfg.inits for r in cfg.regimes for f in budgets
            for s in cfg.seeds]


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def launch(cfg: CompareConfig, argv: list[str], log_path: Path) -> int:
    """One run; its output goes to ``log_path``. Returns the exit code."""
    if cfg.launcher == "inprocess":
        try:
            return finetune_run.main(argv)
        except Exception as e:  # one broken cell must not stop the grid; it is reported as failed
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(f"{type(e).__name__}: {e}\n")
            return 1
    module = "torch.distributed.run" if cfg.launcher == "torchrun" else "accelerate.commands.launch"
    cmd = [sys.executable, "-m", module, *cfg.launch_args, str(ROOT / "finetune" / "run.py"), *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=os.getcwd()).returncode


def seg_ensemble(init: str, regime: str, n_images: float, runs: list[dict[str, Any]],
                 n_boot: int) -> dict[str, Any] | None:
    """Segmentation ensemble row: the seeds' test probability maps (``predictions.npz``, uint16) averaged per pixel,
    scored like one run (per-image metrics inside the roi, mean over images, bootstrap over images).

    Runs without saved maps (older runs) are left out; ``None`` when fewer than two remain. Raises ``ValueError``
    when the runs disagree on the test images, their order, masks or rois.
    """
    runs = [r for r in runs if (Path(r["run_dir"]) / "predictions.npz").is_file()]
    if len(runs) < 2:
        return None
    preds = [load_predictions(Path(r["run_dir"]) / "predictions.npz") for r in runs]
    ref = preds[0]
    for p in preds[1:]:
        if not all(np.array_equal(p[k], ref[k]) for k in ("index", "names", "masks", "rois")):
            raise ValueError(f"{init}/{regime}/{n_images:g} images: runs disagree on the test images; cannot ensemble")
    probs = np.mean([p["probs"] for p in preds], axis=0)
    rows = per_image_metrics(probs, ref["masks"], ref["rois"], threshold=runs[0]["config"]["seg"]["threshold"], seed=0)
    return {
        "init": init, "regime": regime, "label_fraction": n_images, "n_train_images": int(n_images), "n": len(runs),
        "seeds": sorted(r["seed"] for r in runs), "metrics": mean_metrics(rows),
        "ci": bootstrap_images(rows, n_boot=n_boot, seed=0),
        "per_image": [{"name": str(name), **m} for name, m in zip(ref["names"], rows, strict=True)],
    }


def ensembles(results: list[dict[str, Any]], n_boot: int) -> list[dict[str, Any]]:
    """Average test probabilities over the seeds of each (init, regime, label budget) with >= 2 complete runs.

    The budget is the label fraction, or for segmentation the number of annotated images (:func:`seg_ensemble`).
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") == "complete":
            budget = float(r["n_train_images"]) if r.get("task") == "segmentation" else float(r["label_fraction"])
            groups.setdefault((r["init_label"], r["regime"], budget), []).append(r)
    rows = []
    for (init, regime, frac), runs in sorted(groups.items()):
        if len(runs) < 2:
            continue
        if runs[0].get("task") == "segmentation":
            row = seg_ensemble(init, regime, frac, runs, n_boot)
            if row is not None:
                rows.append(row)
            continue
        preds = [np.load(Path(r["run_dir"]) / "predictions.npz") for r in runs]
        ref = preds[0]
        for p in preds[1:]:  # same test cases in the same order, or the average means nothing
            if not (np.array_equal(p["test_index"], ref["test_index"]) and np.array_equal(p["test_labels"],
                                                                                          ref["test_labels"])):
                raise ValueError(f"{init}/{regime}/{frac}: runs disagree on the test set; cannot ensemble")
        probs = np.mean([p["test_probs"] for p in preds], axis=0)
        task = runs[0]["label_task"]
        rows.append({
            "init": init, "regime": regime, "label_fraction": frac, "n": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "metrics": classification_metrics(probs, ref["test_labels"], task),
            "ci": bootstrap_ci(probs, ref["test_labels"], task, n_boot=n_boot, seed=0),
            "roc": roc_curves(probs, ref["test_labels"], task, class_names=runs[0]["data"]["class_names"]),
        })
    return rows


def previous(run_cfg: Any, status: tuple[str, ...] = ("complete",)) -> dict[str, Any] | None:
    """The results a cell left with the same config hash and one of ``status``, else None."""
    existing = read_results(finetune_run.output_dir(run_cfg) / "results.json")
    if existing and existing.get("config_hash") == finetune_run.run_hash(run_cfg) and existing.get("status") in status:
        return existing
    return None


def pending(cfg: CompareConfig, status: tuple[str, ...] = ("complete",)) -> list[list[str]]:
    """The cells of the grid without results of ``status`` (unavailable arms are retried on every run: the
    weights may have appeared; ``status=("complete", "unavailable")`` leaves them out)."""
    return [a for a in grid(cfg) if previous(load_config(finetune_run.FinetuneConfig, a), status) is None]


def main(argv: list[str] | None = None) -> Path:
    return run(load_config(CompareConfig, argv))[0]


def run(cfg: CompareConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Run the missing cells of ``cfg``'s grid, write the report; return its path and every cell's results."""
    state = PartialState()
    cells = grid(cfg)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, argv_cell in enumerate(cells, 1):
        run_cfg = load_config(finetune_run.FinetuneConfig, argv_cell)  # validates the cell before launching
        out = finetune_run.output_dir(run_cfg)
        want = finetune_run.run_hash(run_cfg)
        existing = previous(run_cfg, ("complete", "unavailable", "failed"))
        budget = (f"{run_cfg.seg.n_train_images or 'all'} images" if run_cfg.task == "segmentation"
                  else f"{run_cfg.data.label_fraction:g}")
        init = finetune_run.init_label(run_cfg.init, run_cfg.init_name)
        label = f"[{n}/{len(cells)}] {init} / {run_cfg.regime} / {budget} / seed {run_cfg.seed}"
        if existing and existing.get("status") == "complete":
            state.print(f"{label}: done ({out})")
        elif cfg.collect_only:
            state.print(f"{label}: missing (collect_only)")
            continue
        else:
            state.print(f"{label}: running -> {out}")
            t = time.perf_counter()
            code = launch(cfg, argv_cell, out / "run.log")
            existing = read_results(out / "results.json")
            if code != 0 and not (existing and existing.get("status") == "unavailable"
                                  and existing.get("config_hash") == want):
                tail = (out / "run.log").read_text()[-2000:] if (out / "run.log").exists() else ""
                existing = {"status": "failed", "reason": f"exit code {code}; log {out / 'run.log'}",
                            "init_label": finetune_run.init_label(run_cfg.init, run_cfg.init_name),
                            "regime": run_cfg.regime,
                            "label_fraction": run_cfg.data.label_fraction, "seed": run_cfg.seed, "log_tail": tail,
                            "task": run_cfg.task, "n_train_images": run_cfg.seg.n_train_images}
            state.print(f"{label}: {existing.get('status') if existing else 'no results'} "
                        f"in {time.perf_counter() - t:.0f}s")
        if existing:
            existing.setdefault("run_dir", str(out))
            results.append(existing)

    notes = list(cfg.notes)
    for key, note in LOCAL_SPLIT_NOTES.items():
        if any(key in str(r.get("config", {}).get("data", {}).get("dataset", "")).lower() for r in results):
            notes.append(note)
    budgets = (f"annotated images {cfg.n_train_images} (0 = all)" if base_task(cfg) == "segmentation"
               else f"label fractions {cfg.label_fractions}")
    notes.append(f"Grid: inits {cfg.inits}, regimes {cfg.regimes}, {budgets}, "
                 f"seeds {cfg.seeds}; base config `{cfg.base_config}`"
                 + (f", overrides {cfg.overrides}" if cfg.overrides else "") + ".")
    report = build_report(results, Path(cfg.runs_dir) / "reports" / cfg.name, title=cfg.title,
                          ensembles=ensembles(results, cfg.n_bootstrap), notes=notes)
    state.print(f"report: {report} ({time.perf_counter() - t0:.0f}s)")
    return report, results


if __name__ == "__main__":
    main()
