"""The synthetic-image audit benchmark, read from the generator experiments' audits.

    python benchmarks/bench_audit.py                       # the experiments of benchmarks/bench_generative.py
    python benchmarks/bench_audit.py "experiments=[configs/experiments/generative_pneumonia.yaml]"

Audits nothing itself: each experiment (``configs/experiments/generative_*.yaml``) samples its generators and
audits them with ``scripts/audit_synthetic.py`` in its in-domain feature space (its ``audit.features``); this
script reads every ``audit.json`` the experiment's stage records name and writes
``benchmarks/results/<name>.{json,md}``: per generator, in the ranking order of
:func:`medpretrain.audit.rank_audits`, the cross-fitted discriminator AUC with its CI, the fixed-budget
discriminator score, FID / KID / precision / recall / density / coverage against the real-vs-real baseline,
per-class FID / recall / coverage and the memorised count, with the audit's settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medpretrain.config import load_config
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

GENERATORS = ("vae", "dcgan", "ddpm")


@dataclass
class BenchAuditConfig:
    experiments: list[str] = field(default_factory=lambda: ["configs/experiments/generative_pneumonia.yaml",
                                                            "configs/experiments/generative_busi.yaml"])
    out_dir: str = "benchmarks/results"
    name: str = "audit"


def read_audits(config: Path) -> dict[str, Any]:
    """One experiment's audits (by generator) and where they are."""
    exp = yaml.safe_load(config.read_text()) or {}
    name = str(exp.get("name", config.stem))
    exp_dir = (PROJECT_ROOT / str(exp.get("out_dir", "runs/experiments")) / name).resolve()
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(config)], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, check=True).stdout.strip() or "-"
    except (OSError, subprocess.CalledProcessError):
        commit = "-"
    audits: dict[str, Any] = {}
    for g in GENERATORS:
        path = exp_dir / "stages" / f"audit_{g}.json"
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        audit_json = Path(rec["output"]).with_name("audit.json")
        if audit_json.is_file():
            a = json.loads(audit_json.read_text())
            a.pop("per_image", None)  # thousands of rows: they stay in the run folder
            audits[g] = {"audit": a, "stage_wall_s": rec["wall_s"], "path": str(audit_json)}
    ranking: list[str] = []
    if audits:
        from medpretrain.audit import rank_audits

        ranking = rank_audits({g: x["audit"] for g, x in audits.items()})
    return {"name": name, "title": exp.get("title", name), "config": str(config.relative_to(PROJECT_ROOT))
            if config.is_relative_to(PROJECT_ROOT) else str(config), "config_commit": commit,
            "exp_dir": str(exp_dir), "audits": audits, "ranking": ranking}


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else path


def experiment_markdown(e: dict[str, Any]) -> list[str]:
    md = [f"## {e['title']}", ""]
    if not e["audits"]:
        return [*md, f"`{e['config']}`: no audit has finished yet.", ""]
    first = e["audits"][e["ranking"][0]]["audit"]
    c, real, b = first["config"], first["real"], first["backbone"]
    md += [f"`python scripts/run_experiment.py {e['config']}` (config at commit {e['config_commit']}, audit code "
           f"{first['code_version']}). Real: `{real['dataset']}`, {real['train_split']} split ({real['n_train']} "
           f"images; the generators' training images), {real['heldout_split']} split ({real['n_heldout']} held-out "
           f"images for the memorisation threshold). Feature space and discriminator start: **{b['init']}** "
           f"{b['arch']} (`{_rel(b['source'])}`), the experiment's own SimCLR stage: in-domain, trained without labels.",
           "", f"Settings: {first['fake']['n_used']} fakes per generator (classes evenly), "
           f"{first['distribution']['n_per_side']} a side for FID / KID / PRDC (k = {c['knn_k']}); cross-fitted "
           f"discriminator {c['disc']['folds']} folds x {c['disc']['epochs']} epochs ({c['disc']['regime']}); "
           f"fixed-budget discriminator: {first['probe']['hidden']}-unit MLP, {first['probe']['steps']} full-batch "
           f"gradient-descent steps, {first['probe']['n_per_side']} a side, {first['probe']['folds']} folds; "
           f"memorisation: {c['memo']['rule']} of pixel and feature distance below the {c['memo']['quantile']:g} "
           "quantile of held-out images' nearest-training distances.", "",
           "Best first (" + first_rule() + "); the real-vs-real baseline (other real training images against the "
           "same real side, equal sizes) in brackets.", "",
           "| generator | fixed-budget D loss (nats) | cross-fitted AUC [95% CI] | FID | KID | precision | recall | "
           "density | coverage | memorised | audit wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in e["ranking"]:
        a = e["audits"][g]["audit"]
        fk, rb, d, p = a["distribution"]["fake"], a["distribution"]["real_baseline"], a["discriminator"], a["probe"]
        md.append(f"| {g} | {p['fake']['loss']:.3f} ± {p['fake']['loss_sd']:.3f} ({p['real_baseline']['loss']:.3f}) | "
                  f"{d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, {d['auc_ci95'][1]:.3f}] | {fk['fid']:.2f} ({rb['fid']:.2f}) "
                  f"| {fk['kid']:.4f} ({rb['kid']:.4f}) | {fk['precision']:.3f} ({rb['precision']:.3f}) | "
                  f"{fk['recall']:.3f} ({rb['recall']:.3f}) | {fk['density']:.3f} ({rb['density']:.3f}) | "
                  f"{fk['coverage']:.3f} ({rb['coverage']:.3f}) | {a['memorisation']['n_flagged']} / "
                  f"{a['fake']['n_used']} | {a['wall_s']:.0f} |")
    classes = [k for k, v in (first.get("per_class") or {}).items() if "fake" in v]
    if classes:
        md += ["", "Per class (fakes of a class against real training images of that class; real vs real in "
                   "brackets; n a side in the header):", "",
               "| generator | " + " | ".join(f"{k} (n={first['per_class'][k]['n_per_side']}): FID / recall / coverage"
                                          for k in classes) + " |", "|---|" + "---|" * len(classes)]
        for g in e["ranking"]:
            pc = e["audits"][g]["audit"].get("per_class") or {}
            cells = []
            for k in classes:
                x = pc.get(k, {})
                cells.append("-" if "fake" not in x else
                             f"{x['fake']['fid']:.2f} ({x['real_baseline']['fid']:.2f}) / {x['fake']['recall']:.3f} / "
                             f"{x['fake']['coverage']:.3f}")
            md.append(f"| {g} | " + " | ".join(cells) + " |")
    md += ["", "Full reports (most / least realistic samples, closest training images, class grids): "
           + ", ".join(f"`{_rel(e['audits'][g]['path']).removesuffix('.json')}.md`" for g in e["ranking"])
           + " (not committed).", ""]
    return md


def first_rule() -> str:
    from medpretrain.audit import RANKING_RULE

    return RANKING_RULE


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchAuditConfig, argv)
    configs = [PROJECT_ROOT / c for c in cfg.experiments]
    for c in configs:
        if not c.is_file():
            raise FileNotFoundError(f"{c}: no such experiment file")
    results = {"benchmark": "synthetic-image audit of the generator experiments (issue 17)", "settings": vars(cfg),
               "code_version": code_version(), "experiments": [read_audits(c) for c in configs]}
    md = ["# Synthetic-image audit of the generator experiments", "",
          f"Written by `benchmarks/bench_audit.py` (code {results['code_version']}) from the audits the experiments "
          "ran (`scripts/audit_synthetic.py`); generator training and the other numbers: `generative.md` beside "
          "this file.", ""]
    for e in results["experiments"]:
        md += experiment_markdown(e)
    out = PROJECT_ROOT / cfg.out_dir
    atomic_write_text(out / f"{cfg.name}.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out / f"{cfg.name}.md", "\n".join(md))
    print(f"wrote {out / (cfg.name + '.json')} and {out / (cfg.name + '.md')}")
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main, sys.argv[1:])
