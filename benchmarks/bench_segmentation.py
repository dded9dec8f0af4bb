"""Benchmark of segmentation transfer on DRIVE: test Dice for scratch, selfsup and ImageNet inits.

    .venv/bin/python benchmarks/bench_segmentation.py                       # ~10 min on a loaded 2-core CPU
    # the published results (~40 min on a shared 2-core CPU):
    .venv/bin/python benchmarks/bench_segmentation.py arch=resnet18 epochs=12 steps_per_epoch=40 pretrain_epochs=100

1. **selfsup**: ``pretrain/simclr.py`` launched through ``accelerate launch`` on DRIVE's own training
   images (``data.dataset=drive:drive``, split ``train``; no masks, no test images), resized to
   ``pretrain_size`` px; kNN monitoring is off (DRIVE has no image labels).
2. For each init (scratch, the selfsup export, imagenet) and each budget of annotated training images
   (``budgets``; 0 = all 18 left after the 2 validation images), one ``finetune/run.py task=segmentation``
   run (full fine-tuning, the same patches, steps and seed for every arm), in this process.
   ImageNet is reported as unavailable when the weights are missing (never replaced by random weights).

Writes ``benchmarks/results/segmentation_bench.json`` (every run's test metrics, CIs, timings, budgets, machine)
and ``segmentation_bench.md`` (``segmentation.md`` is the DRIVE experiment's, from ``benchmarks/protocol_report.py``). Every number in them is measured by this script.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medpretrain.config import load_config
from medpretrain.utils import atomic_write_text, code_version

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchConfig:
    arch: str = "cbr_tiny"
    budgets: list[int] = field(default_factory=lambda: [2, 5, 0])
    inits: list[str] = field(default_factory=lambda: ["scratch", "selfsup", "imagenet"])
    patch_size: int = 64
    batch_size: int = 8
    epochs: int = 4
    steps_per_epoch: int = 10
    """Optimizer steps per epoch, the same for every budget (patches are drawn until it is reached)."""
    lr: float = 1e-3
    seed: int = 0
    pretrain_size: int = 128
    pretrain_epochs: int = 20
    pretrain_batch: int = 9
    work_dir: str = "runs/bench_segmentation"
    out: str = "benchmarks/results/segmentation_bench"  # segmentation.md: protocol_report.py from drive.yaml


def pretrain(cfg: BenchConfig, work: Path) -> tuple[Path, float]:
    out = work / "pretrain"
    run_name = f"drive-{cfg.arch}"
    # A fresh export every time: simclr.py refuses to overwrite a finished run, and a stale export from
    # another budget must not be benchmarked.
    shutil.rmtree(out / run_name, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "pretrain/simclr.py"), "--config", str(ROOT / "configs/simclr.yaml"),
           "data.dataset=drive:drive", f"data.image_size={cfg.pretrain_size}", f"backbone.arch={cfg.arch}",
           "backbone.stem=standard", "split=train", f"train.batch_size={cfg.pretrain_batch}",
           f"train.epochs={cfg.pretrain_epochs}", "train.knn_every=-1", "train.lr=0.01",
           f"out_dir={out}", f"run_name={run_name}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return out / run_name / "backbone.safetensors", time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(BenchConfig, argv)
    work = ROOT / cfg.work_dir
    export, pretrain_s = (None, 0.0)
    if "selfsup" in cfg.inits:
        export, pretrain_s = pretrain(cfg, work)
        print(f"selfsup export: {export} ({pretrain_s:.0f}s)")
    runs = []
    for init in cfg.inits:
        for n in cfg.budgets:
            arg_init = str(export) if init == "selfsup" else init
            out = work / "finetune" / init / f"n{n or 'all'}"
            argv_run = ["--config", str(ROOT / "configs/finetune_drive.yaml"), f"init={arg_init}",
                        f"backbone.arch={cfg.arch}", "backbone.stem=standard", "regime=full",
                        f"seg.n_train_images={n}", f"seg.patch_size={cfg.patch_size}",
                        # Enough patches that every budget fills steps_per_epoch steps.
                        f"seg.patches_per_image={cfg.steps_per_epoch * cfg.batch_size}",
                        f"optim.batch_size={cfg.batch_size}", f"optim.epochs={cfg.epochs}",
                        f"optim.max_steps_per_epoch={cfg.steps_per_epoch}", f"optim.lr={cfg.lr}",
                        f"seed={cfg.seed}", f"output_dir={out}", "n_bootstrap=1000"]
            t = time.perf_counter()
            code = subprocess.run([sys.executable, str(ROOT / "finetune" / "run.py"), *argv_run], cwd=ROOT).returncode
            res = json.loads((out / "results.json").read_text())
            row = {"init": init, "budget": n, "n_train_images": res.get("n_train_images", n), "status": res["status"],
                   "exit_code": code, "wall_s": round(time.perf_counter() - t, 1)}
            if res["status"] == "complete":
                row.update(test=res["metrics"]["test"], ci=res["ci"], best_epoch=res["best_epoch"],
                           val_dice=res["metrics"]["val_best"]["dice"])
            else:
                row["reason"] = res.get("reason")
            print(json.dumps({k: v for k, v in row.items() if k != "ci"}))
            runs.append(row)
    result = {
        "benchmark": "DRIVE vessel segmentation transfer (test Dice inside the field of view)",
        "config": cfg.__dict__, "pretrain_s": pretrain_s, "selfsup_export": str(export) if export else None,
        "runs": runs, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                  "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                                  "loadavg": os.getloadavg()},
        "code_version": code_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = ROOT / cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    return result


def markdown(result: dict) -> str:
    c = result["config"]
    budgets = c["budgets"]
    pool = max((r["n_train_images"] for r in result["runs"] if r["status"] == "complete"), default=0)
    lines = [
        "# DRIVE segmentation transfer: scratch vs self-supervised vs ImageNet", "",
        f"Measured {result['date']} by `benchmarks/bench_segmentation.py` on {result['machine']['cpus']} CPU cores "
        f"(shared; load {', '.join(f'{x:.1f}' for x in result['machine']['loadavg'])}), torch "
        f"{result['machine']['torch']}, code {result['code_version']}.", "",
        f"**Budget (small, CPU):** U-Net on `{c['arch']}`, full fine-tuning, {c['epochs']} epochs x "
        f"{c['steps_per_epoch']} steps of {c['batch_size']} patches of {c['patch_size']} px (the same for every "
        f"budget), Adam lr {c['lr']}, one seed ({c['seed']}); sliding-window inference on the 20 official test "
        "images, per-image metrics inside the field of view, mean over images, 95% bootstrap CI over images. "
        "selfsup = SimCLR on DRIVE's own 18 training images (no masks) resized to "
        f"{c['pretrain_size']} px, {c['pretrain_epochs']} epochs ({result['pretrain_s']:.0f} s). "
        f"{c['epochs'] * c['steps_per_epoch']} optimizer steps per run and one seed: a small CPU budget, so "
        "differences between arms are indicative, not a finding (the per-image CIs do not cover seed variance). "
        f"Wall clock of pretraining + all runs: {(result['pretrain_s'] + sum(r['wall_s'] for r in result['runs'])) / 60:.0f}"
        " min.",
        "",
        "| init | " + " | ".join(f"{b or f'all ({pool})'} images" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets)]
    for init in c["inits"]:
        cells = []
        for b in budgets:
            r = next((r for r in result["runs"] if r["init"] == init and r["budget"] == b), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "complete":
                cells.append(r["status"])
            else:
                ci = r["ci"]["dice"]
                cells.append(f"{r['test']['dice']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    lines += ["", "Test Dice [95% CI]. All metrics per run (Dice, Jaccard, sensitivity, specificity, pixel AUC):", "",
              "| init | images | Dice | Jaccard | Sens | Spec | AUC | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r["status"] == "complete":
            t = r["test"]
            lines.append(f"| {r['init']} | {r['n_train_images']} | {t['dice']:.3f} | {t['jaccard']:.3f} | "
                         f"{t['sensitivity']:.3f} | {t['specificity']:.3f} | {t['auc']:.3f} | {r['wall_s']} |")
    trivial = [r for r in result["runs"] if r["status"] == "complete" and r["test"]["sensitivity"] > 0.99
               and r["test"]["specificity"] < 0.01]
    if trivial:
        lines += ["", f"**{len(trivial)} of {sum(r['status'] == 'complete' for r in result['runs'])} complete runs "
                  "selected a model that marks every field-of-view pixel as vessel** (sensitivity 1, specificity 0; "
                  "Dice = 2f/(1+f) for vessel fraction f): at this budget the validation-Dice selection preferred "
                  "that trivial prediction to any later epoch. Those Dice values measure the budget, not the "
                  "initialisations; a real comparison needs many more steps (e.g. `epochs=50 steps_per_epoch=50`, "
                  "a GPU)."]
    unavailable = [r for r in result["runs"] if r["status"] != "complete"]
    if unavailable:
        lines += ["", "Unavailable arms (not replaced by random weights):", ""]
        if any(r["init"] == "imagenet" for r in unavailable):
            lines[-2] += (" the ImageNet arm is expected to be unavailable where no ImageNet weights file exists "
                          "(as on this offline machine); with the weights in place "
                          "(`MEDPRETRAIN_IMAGENET_WEIGHTS`) the same command runs it.")
        for reason in sorted({str(r.get("reason")) for r in unavailable}):
            lines.append(f"- {', '.join(sorted({r['init'] for r in unavailable if str(r.get('reason')) == reason}))}: "
                         f"{reason}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
