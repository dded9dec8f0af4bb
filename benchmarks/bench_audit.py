"""Audit the generative benchmark's samples (``samples.npz`` under the generative run folders).

    python benchmarks/bench_audit.py                                   # selfsup feature space (must exist)
    python benchmarks/bench_audit.py backbone=vae                      # the newest VAE encoder export instead
    python benchmarks/bench_audit.py audit_args="disc.epochs=3 n_fake=1000"

Trains no generator: it looks for ``samples.npz`` under ``search`` (default ``runs/generative`` and
``runs/bench_generative``, as written by ``benchmarks/bench_generative.py`` / ``generative/sample.py``), runs
``scripts/audit_synthetic.py`` on each, and writes ``benchmarks/results/<name>.{json,md}``. With no
samples, or no usable backbone, it writes and says exactly that.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medpretrain.config import load_config
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version


@dataclass
class BenchAuditConfig:
    search: list[str] = field(default_factory=lambda: ["runs/generative", "runs/bench_generative"])
    """Folders searched recursively for samples.npz (relative to the project root)."""
    backbone: str = "selfsup"
    n_fake: int = 500
    n_real: int = 500
    disc_epochs: int = 2
    audit_args: str = ""
    """Further ``key=value`` overrides for audit_synthetic.py."""
    out_dir: str = "benchmarks/results"
    runs_dir: str = "runs/audit/bench"
    name: str = "audit"
    note: str = ""
    """Free text for the report (e.g. why this feature space), written by the person running the bench."""


def run_audit(args: list[str], out: Path) -> dict[str, Any]:
    """Run ``scripts/audit_synthetic.py`` as its own process and read the ``audit.json`` it writes.

    Raises:
        RuntimeError: the audit exited non-zero (e.g. the backbone is unavailable); its last stderr line says why.
    """
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "audit_synthetic.py"), *args],
                          cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return json.loads((out / "audit.json").read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchAuditConfig, argv)
    found = sorted(p for d in cfg.search for p in (PROJECT_ROOT / d).rglob("samples.npz"))
    results: dict[str, Any] = {
        "benchmark": "synthetic-sample audit of the generative benchmark's samples (PneumoniaMNIST 28 px)",
        "settings": vars(cfg), "code_version": code_version(),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                    "cuda": torch.cuda.is_available(), "torch": torch.__version__},
        "audits": {},
    }
    if not found:
        results["note"] = f"no samples.npz under {cfg.search}: nothing audited, nothing trained"
        print(results["note"])
    for path in found:
        rel = path.parent.relative_to(PROJECT_ROOT)
        out = PROJECT_ROOT / cfg.runs_dir / str(rel).replace(os.sep, "__")
        args = [f"fake={path}", f"backbone={cfg.backbone}", f"n_fake={cfg.n_fake}", f"n_real={cfg.n_real}",
                f"disc.epochs={cfg.disc_epochs}", f"out={out}", *shlex.split(cfg.audit_args)]
        print(f"== audit {rel}", flush=True)
        try:
            r = run_audit(args, out)
        except RuntimeError as e:  # the backbone is unavailable: record why, never substitute silently
            results["audits"][str(rel)] = {"status": "not run", "reason": str(e)}
            print(e)
            continue
        results["audits"][str(rel)] = {
            "status": "ok", "report": os.path.relpath(out / "audit.md", PROJECT_ROOT), "backbone": r["backbone"],
            "discriminator": {k: r["discriminator"][k] for k in ("auc", "auc_ci95", "fold_auc", "chance_sd", "n_real", "n_fake")},
            "distribution": r["distribution"], "memorisation": r["memorisation"], "wall_s": r["wall_s"]}
    out_dir = PROJECT_ROOT / cfg.out_dir
    atomic_write_text(out_dir / f"{cfg.name}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / f"{cfg.name}.md", report(results))
    print(f"wrote {out_dir / (cfg.name + '.md')}")
    return results


def report(r: dict[str, Any]) -> str:
    lines = ["# Synthetic-sample audit of the generative benchmark", "",
             f"Written by `benchmarks/bench_audit.py` ({r['code_version']}); {r['machine']['logical_cpus']} logical CPUs "
             f"(shared), CUDA {r['machine']['cuda']}. Settings: "
             f"{json.dumps({k: v for k, v in r['settings'].items() if k != 'note'})}.", ""]
    if r.get("note"):
        lines += [f"**{r['note']}**", ""]
    if r["settings"].get("note"):
        lines += [r["settings"]["note"], ""]
    ok = {k: v for k, v in r["audits"].items() if v["status"] == "ok"}
    for k, v in r["audits"].items():
        if v["status"] != "ok":
            lines += [f"- `{k}`: not audited: {v['reason']}"]
    if ok:
        lines += ["Fake vs real, with the real-vs-real baseline in brackets (same sample sizes). AUC: cross-fitted "
                  "discriminator, mean of per-fold held-out AUCs (0.5 = indistinguishable).", "",
                  "| samples | feature space | disc AUC (95% CI) | FID (baseline) | KID x1000 (baseline) | precision | "
                  "recall | density | coverage | memorised | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in ok.items():
            d, f, b, m = v["discriminator"], v["distribution"]["fake"], v["distribution"]["real_baseline"], v["memorisation"]
            space = f"{v['backbone']['init']} {v['backbone']['arch']}" + (" (UNTRAINED)" if v["backbone"]["untrained"] else "")
            lines.append(
                f"| `{k}` | {space} | {d['auc']:.3f} ({d['auc_ci95'][0]:.3f}-{d['auc_ci95'][1]:.3f}) | "
                f"{f['fid']:.3g} ({b['fid']:.3g}) | {1000 * f['kid']:.3g} ({1000 * b['kid']:.3g}) | "
                f"{f['precision']:.3f} ({b['precision']:.3f}) | {f['recall']:.3f} ({b['recall']:.3f}) | "
                f"{f['density']:.3f} ({b['density']:.3f}) | {f['coverage']:.3f} ({b['coverage']:.3f}) | "
                f"{m['n_flagged']} / {d['n_fake']} | {v['wall_s']:.0f} |")
        lines += ["", "Full reports (grids of the most / least realistic samples and of the closest training "
                  "images): " + ", ".join(f"`{v['report']}`" for v in ok.values()) + " (not committed)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
