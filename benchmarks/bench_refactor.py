"""Behaviour-preservation check for restructurings: fixed-seed tiny runs of every training entry script.

    .venv/bin/python benchmarks/bench_refactor.py --label before   # on the commit before a restructuring
    .venv/bin/python benchmarks/bench_refactor.py --label after    # after it: writes the comparison table

Each run goes through the real entry script (one process, CPU, fp32, one thread) on PneumoniaMNIST 28 px
with ``cbr_tiny`` and a fixed seed, and records every logged loss and the final metrics. A behaviour-preserving
change reproduces them exactly; ``benchmarks/results/refactor.md`` shows both columns and the largest
difference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

TRAIN = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=6", "train.log_every=1",
         "train.checkpoint_every=0", "train.seed=0"]
TIMING = ("time_s", "images_per_s", "epoch_s", "step_s", "wall_s", "elapsed_s")  # machine-dependent: not compared
RUNS: dict[str, tuple[str, list[str]]] = {
    "simclr": ("pretrain/simclr.py", [*TRAIN, "train.knn_every=0"]),
    # moco.split_bn=off: the full-batch BatchNorm of the 'before' commit (split-batch BN is the new default
    # with one process); the 'before' label was recorded before the key existed.
    "moco": ("pretrain/moco.py", [*TRAIN, "train.knn_every=0", "moco.queue_size=64", "moco.split_bn=off"]),
    "vae": ("generative/vae.py", [*TRAIN, "train.grid_size=16", "train.log_with=none"]),
    "dcgan": ("generative/dcgan.py", [*TRAIN, "train.grid_size=16", "train.log_with=none"]),
    "finetune": ("finetune/run.py", ["--config", "configs/finetune.yaml", "backbone.arch=cbr_tiny", "optim.epochs=2",
                                     "optim.max_steps_per_epoch=3", "optim.batch_size=32", "data.label_fraction=0.05",
                                     "init=scratch", "regime=full", "seed=0", "n_bootstrap=50"]),
}


def read_metrics(path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if v not in ("", None) and k not in TIMING:
                    try:
                        out.setdefault(k, []).append(float(v))
                    except ValueError:
                        pass
    return out


def run_one(name: str, script: str, args: list[str], tmp: Path) -> dict[str, object]:
    out = tmp / name
    extra = [f"output_dir={out}"] if name == "finetune" else [f"out_dir={out}", "run_name=ref"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / script), *args, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run = out if name == "finetune" else out / "ref"
    rec: dict[str, object] = {"metrics": read_metrics(run / "metrics.csv")}
    if (run / "results.json").exists():
        res = json.loads((run / "results.json").read_text())
        if name == "finetune":
            rec["final"] = {k: res["metrics"]["test"][k] for k in ("auc", "accuracy")}
        else:
            rec["final"] = {k: res[k] for k in ("val_mse", "val_psnr") if k in res}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True, help="before | after (or any name)")
    ap.add_argument("--commit", default=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                       capture_output=True, text=True).stdout.strip())
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "refactor.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run_one(name, script, a, Path(tmp)) for name, (script, a) in RUNS.items()}
    data[args.label] = {"commit": args.commit, "runs": runs}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    write_markdown(data)
    print(f"wrote {path}")


def write_markdown(data: dict[str, dict]) -> None:
    labels = [k for k in ("before", "after") if k in data]
    lines = ["# Behaviour preserved across the restructuring (issue 13)", "",
             "Fixed-seed tiny runs through the real entry scripts: PneumoniaMNIST 28 px, `cbr_tiny`, one process, "
             "CPU fp32, `OMP_NUM_THREADS=1`, seed 0 (settings in `benchmarks/bench_refactor.py`).", "",
             "| run | series | " + " | ".join(f"{k} ({data[k]['commit']})" for k in labels) + " | max abs diff |",
             "|---|---|" + "---|" * len(labels) + "---|"]
    lines[3:3] = ["MoCo runs with `moco.split_bn=off` after the change: split-batch BatchNorm is the new single-process "
                  "default (an intended change of issue 13), so the old full-batch BatchNorm is what is compared.", ""]
    for name in RUNS:
        series: dict[str, list[list[float]]] = {}
        for k in labels:
            rec = data[k]["runs"][name]
            for s, vals in rec["metrics"].items():
                if s in ("step", "epoch", "lr", *TIMING):
                    continue
                series.setdefault(s, []).append(vals)
            for s, v in rec.get("final", {}).items():
                series.setdefault(f"final {s}", []).append([v])
        for s, cols in series.items():
            diff = (max((0.0 if a != a and b != b else abs(a - b)) for a, b in zip(cols[0], cols[1], strict=True))
                    if len(cols) == 2 and len(cols[0]) == len(cols[1]) else float("nan"))  # nan == nan here
            cells = [", ".join(f"{v:.5g}" for v in c) for c in cols]
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + f" | {diff:.3g} |")
    (RESULTS / "refactor.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
