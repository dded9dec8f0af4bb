"""How many fine-tuning cells at once: one grid of real cells run with ``workers=1`` (one cell at a time, every
CPU thread) and with ``workers=2`` (two one-thread cells at once), same cells, same results; writes
``benchmarks/results/grid_workers.md`` (+ ``.json``).

    .venv/bin/python benchmarks/bench_grid_workers.py                    # 4 full + 4 linear ResNet-18 cells, 28 px
    .venv/bin/python benchmarks/bench_grid_workers.py --steps 150 --arch timm:tf_efficientnet_lite0 --image-size 48

Run it on an otherwise idle machine: the two arms run one after the other and only their ratio means something.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from medpretrain.config import load_config
from medpretrain.pipeline.grid import CompareConfig, run_grid
from medpretrain.utils import atomic_write_text, code_version, cpu_model

ROOT = Path(__file__).resolve().parent.parent


def arm(workers: int, args: argparse.Namespace, runs: Path) -> dict:
    argv = ["base_config=" + str(ROOT / "configs/finetune.yaml"), "inits=[scratch]", f"regimes=[{args.regimes}]",
            f"label_fractions=[{args.fractions}]", f"seeds=[{args.seeds}]", "launcher=inprocess", "n_bootstrap=100",
            f"name=w{workers}", f"runs_dir={runs}", f"workers={workers}",
            "overrides=" + json.dumps([f"backbone.arch={args.arch}", "backbone.stem=standard",
                                       f"optim.steps={args.steps}", "optim.eval_every=25", "optim.batch_size=32",
                                       "n_bootstrap=100",
                                       *([f"data.image_size={args.image_size}"] if args.image_size else [])])]
    t0 = time.perf_counter()
    _, results = run_grid(load_config(CompareConfig, argv), None)
    wall = time.perf_counter() - t0
    assert all(r.status == "complete" for r in results), [r.status for r in results]
    return {"workers": workers, "cells": len(results), "wall_s": round(wall, 1),
            "auc": [round(float(r.metrics["test"]["auc"]), 4) for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--regimes", default="linear, full")
    p.add_argument("--fractions", default="0.1, 1.0")
    p.add_argument("--seeds", default="0, 1")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arms = [arm(w, args, Path(tmp) / f"w{w}") for w in (1, 2)]
    speedup = arms[0]["wall_s"] / arms[1]["wall_s"]
    max_diff = max(abs(a - b) for a, b in zip(arms[0]["auc"], arms[1]["auc"], strict=True))
    record = {"benchmark": "grid_workers", "code": code_version(), "machine": cpu_model(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "settings": vars(args), "arms": arms, "speedup_workers2": round(speedup, 2),
              "max_test_auc_difference": max_diff}
    out = Path(args.out)
    atomic_write_text(out / "grid_workers.json", json.dumps(record, indent=2) + "\n")
    md = ["# Fine-tuning cells at once (`CompareConfig.workers`)", "",
          f"`python benchmarks/bench_grid_workers.py {' '.join(sys.argv[1:])}`; code {record['code']}; "
          f"{record['machine']}, {record['cpus']} threads, torch {record['torch']}. Data: PneumoniaMNIST (28 px"
          f"{', resized to ' + str(args.image_size) + ' px' if args.image_size else ''}), scratch {args.arch}, "
          f"regimes [{args.regimes}], label fractions [{args.fractions}], seeds [{args.seeds}], "
          f"{args.steps} optimiser steps of batch 32 per cell. Same cells in both arms, one after the other.", "",
          "| workers | threads per cell | cells | wall-clock (s) |", "|---|---|---|---|"]
    md += [f"| {a['workers']} | {max(1, record['cpus'] // a['workers'])} | {a['cells']} | {a['wall_s']} |" for a in arms]
    md += ["", f"Speed-up with 2 workers: **{speedup:.2f}x**; largest difference of a cell's test AUC between the arms: "
               f"{max_diff:.4f} (float rounding of one vs two threads).", ""]
    atomic_write_text(out / "grid_workers.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
