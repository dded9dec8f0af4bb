"""Benchmark the generative pretraining stage on PneumoniaMNIST (28 px) after a fixed budget.

What it runs (each through ``accelerate launch``, one CPU process unless told otherwise):

* ``generative/vae.py`` and ``generative/dcgan.py`` with their default configs (``configs/*.yaml``,
  ResNet-18 encoder / discriminator trunk) and a fixed optimizer-step budget, recording wall-clock;
* ``generative/sample.py`` for ``n_samples`` images from each (seeded).

What it reports (``benchmarks/results/generative.{json,md}``):

* VAE reconstruction error on the official validation split (524 images, never trained on), on the
  [0, 1] pixel scale: MSE and PSNR (z = posterior mean); as a floor, the same for predicting the
  training split's mean image for every input;
* sample statistics of VAE and DCGAN samples against the real validation images: pixel mean / std,
  mean pairwise distance ("diversity", RMS per pixel) and its ratio to the real images', and the L1
  distance between 32-bin intensity histograms (0 = identical, 2 = disjoint).

Audit scores (discriminator AUC, FID/KID, precision/recall, memorisation) of these samples come from
``benchmarks/bench_audit.py``, which audits the samples this script leaves under ``runs/bench_generative``
and writes ``benchmarks/results/audit.md``.

Usage::

    python benchmarks/bench_generative.py                        # default budgets (a CPU run)
    python benchmarks/bench_generative.py vae_steps=600 dcgan_steps=600 launch_args="--num_processes 1"
    python benchmarks/bench_generative.py report_only=true observation="..."   # add what the grids show
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpretrain.config import DataConfig, load_config
from medpretrain.data import build_dataset
from medpretrain.generative.monitor import sample_statistics
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

AUDIT_NOTE = ("Audit scores of these samples are measured separately by benchmarks/bench_audit.py "
              "(benchmarks/results/audit.md).")


@dataclass
class BenchConfig:
    vae_steps: int = 60
    """Optimizer steps for the VAE (60 = one epoch of the 3882 training images at batch 64)."""
    dcgan_steps: int = 40
    """Optimizer steps for the DCGAN (each trains D on a real and a fake batch and G once)."""
    arch: str = "resnet18"
    batch_size: int = 64
    seed: int = 0
    n_samples: int = 1000
    runs_dir: str = "runs/bench_generative"
    """Where the benchmark's training runs go (relative to the project root)."""
    out_dir: str = "benchmarks/results"
    name: str = "generative"
    threads: int = 0
    """OMP_NUM_THREADS for the runs (0: leave as is)."""
    launch_args: str = "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
    observation: str = ""
    """What the sample grids show, written by a person after looking at them (the numbers cannot say it)."""
    report_only: bool = False
    """Re-render ``<name>.md`` from the existing ``<name>.json`` (e.g. after adding an ``observation``)."""


def run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=True)
    return time.perf_counter() - t0


def histogram_l1(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> float:
    """L1 distance between normalised intensity histograms of two image sets in [0, 1]."""
    ha = torch.histc(a.float().flatten(), bins=bins, min=0, max=1)
    hb = torch.histc(b.float().flatten(), bins=bins, min=0, max=1)
    return float((ha / ha.sum() - hb / hb.sum()).abs().sum())


def load_samples(out: Path) -> torch.Tensor:
    with np.load(out / "samples.npz") as npz:
        images = torch.from_numpy(npz["images"].astype(np.float32) / 255.0)
    return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchConfig, argv)
    out = PROJECT_ROOT / cfg.out_dir
    if cfg.report_only:
        results = json.loads((out / f"{cfg.name}.json").read_text())
        if cfg.observation:
            results["observation"] = cfg.observation
            atomic_write_text(out / f"{cfg.name}.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
        atomic_write_text(out / f"{cfg.name}.md", report(results))
        return results
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    runs = (PROJECT_ROOT / cfg.runs_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    launch = [sys.executable, "-m", "accelerate.commands.launch", *shlex.split(cfg.launch_args)]
    common = [f"backbone.arch={cfg.arch}", f"train.batch_size={cfg.batch_size}", f"train.seed={cfg.seed}",
              "train.log_with=none", "train.checkpoint_every=0", f"run_name={stamp}"]

    data_cfg = DataConfig()
    val = build_dataset(data_cfg, "val", unlabeled=True, normalize=False)
    train = build_dataset(data_cfg, "train", unlabeled=True, normalize=False)
    real = torch.stack([val[i]["image"] for i in range(len(val))])  # [0, 1]
    mean_image = torch.stack([train[i]["image"] for i in range(len(train))]).mean(0, keepdim=True)
    floor_mse = float((real - mean_image).pow(2).mean())

    results: dict[str, Any] = {
        "benchmark": "generative pretraining on PneumoniaMNIST 28 px (fixed step budget)",
        "settings": vars(cfg) | {"dataset": data_cfg.dataset, "val_images": len(val), "train_images": len(train)},
        "code_version": code_version(),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                    "omp_threads": env.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "audit": {"status": "see benchmarks/results/audit.md", "note": AUDIT_NOTE},
        "baseline": {"mean_image_val_mse": floor_mse, "mean_image_val_psnr": 10 * math.log10(1 / floor_mse)},
        "methods": {},
    }
    for method, steps, out_name in (("vae", cfg.vae_steps, "decoder"), ("dcgan", cfg.dcgan_steps, "generator")):
        out_dir = runs / method
        wall = run([*launch, f"generative/{method}.py", *common, f"out_dir={out_dir}",
                    f"train.max_steps={steps}"], env)
        run_dir = out_dir / stamp
        train_res = json.loads((run_dir / "results.json").read_text())
        samples_dir = run_dir / "bench_samples"
        run([sys.executable, "generative/sample.py", "--model", str(run_dir / f"{out_name}.safetensors"),
             "--n", str(cfg.n_samples), "--out", str(samples_dir), "--seed", str(cfg.seed), "--png", "false"], env)
        samples = load_samples(samples_dir)
        stats = sample_statistics(samples * 2 - 1, real * 2 - 1)
        stats["histogram_l1"] = histogram_l1(samples, real)
        entry: dict[str, Any] = {"steps": train_res["steps"], "epochs": train_res["epochs"],
                                 "train_wall_s": train_res["train_wall_s"], "launch_wall_s": wall,
                                 "samples": stats, "run_dir": os.path.relpath(run_dir, PROJECT_ROOT)}
        if method == "vae":
            entry["reconstruction"] = {"val_mse": train_res["val_mse"], "val_psnr": train_res["val_psnr"]}
        results["methods"][method] = entry
        print(json.dumps({method: entry}, indent=1), flush=True)

    if cfg.observation:
        results["observation"] = cfg.observation
    atomic_write_text(out / f"{cfg.name}.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out / f"{cfg.name}.md", report(results))
    print(f"wrote {out / (cfg.name + '.json')} and {out / (cfg.name + '.md')}")
    return results


def report(r: dict[str, Any]) -> str:
    s, m = r["settings"], r["methods"]
    vae, gan = m["vae"], m["dcgan"]
    lines = [
        "# Generative pretraining benchmark (PneumoniaMNIST, 28 px)",
        "",
        f"Written by `benchmarks/bench_generative.py` ({r['code_version']}). Machine: {r['machine']['logical_cpus']} "
        f"logical CPUs, OMP threads {r['machine']['omp_threads'] or 'default'}, CUDA {r['machine']['cuda']}; "
        "the machine was shared with other jobs, so wall-clock times are upper bounds.",
        "",
        f"Budget: VAE {vae['steps']} optimizer steps, DCGAN {gan['steps']} optimizer steps, batch {s['batch_size']}, "
        f"{s['arch']} encoder / discriminator trunk, seed {s['seed']}, default configs otherwise "
        "(`configs/vae.yaml`, `configs/dcgan.yaml`). This is a smoke-sized CPU budget: the numbers show the "
        "pipeline works and give a reference point, not converged models.",
        "",
        f"**{AUDIT_NOTE}**",
        "",
        "## VAE reconstruction (validation split, never trained on; [0, 1] pixel scale, z = posterior mean)",
        "",
        "| model | val MSE | val PSNR (dB) | train wall-clock (s) |",
        "|---|---|---|---|",
        f"| VAE ({s['arch']}, {vae['steps']} steps) | {vae['reconstruction']['val_mse']:.4f} | "
        f"{vae['reconstruction']['val_psnr']:.2f} | {vae['train_wall_s']:.0f} |",
        f"| floor: training mean image for every input | {r['baseline']['mean_image_val_mse']:.4f} | "
        f"{r['baseline']['mean_image_val_psnr']:.2f} | - |",
        "",
        f"## Sample statistics ({s['n_samples']} seeded samples vs the {s['val_images']} real validation images)",
        "",
        "Pixel values on [0, 1]. Diversity = mean pairwise Euclidean distance / sqrt(pixels) (RMS per-pixel "
        "difference of two images); ratio = samples' / real images' (near 0: collapse). Histogram L1 = distance "
        "between 32-bin intensity histograms (0 identical, 2 disjoint).",
        "",
        "| source | steps | mean | std | diversity | diversity ratio | histogram L1 | train wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    real = vae["samples"]
    lines.append(f"| real validation images | - | {real['real_mean']:.3f} | {real['real_std']:.3f} | "
                 f"{real['real_diversity']:.3f} | 1 | 0 | - |")
    for name, e in (("VAE", vae), ("DCGAN", gan)):
        x = e["samples"]
        lines.append(f"| {name} samples | {e['steps']} | {x['mean']:.3f} | {x['std']:.3f} | {x['diversity']:.3f} | "
                     f"{x['diversity_ratio']:.3f} | {x['histogram_l1']:.3f} | {e['train_wall_s']:.0f} |")
    if r.get("observation"):
        lines += ["", "## Observations (by eye, from the sample grids)", "", r["observation"]]
    lines += ["", "Runs (checkpoints, grids, loss curves): "
              + ", ".join(f"`{e['run_dir']}`" for e in (vae, gan)) + " (not committed).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
