"""Why a transfer helps (issue 18): feature reuse, the reinit:<k> sweep, convergence and cross-domain
supervised transfer, summarised from real experiment runs.

    python scripts/run_experiment.py configs/experiments/busi.yaml                 # the cross-domain sources
    python scripts/run_experiment.py configs/experiments/pneumonia.yaml
    python scripts/run_experiment.py configs/experiments/transfer_pneumonia.yaml
    python scripts/run_experiment.py configs/experiments/transfer_busi.yaml
    .venv/bin/python benchmarks/transfer_report.py        # -> benchmarks/results/transfer_analysis.md (+ .json, plots)

Reads each experiment's cells (:func:`medpretrain.pipeline.experiment.experiment_cells`: the cells of its own grids, variants
included; nothing is re-run). Per experiment, at its label budget:

* **reuse**: per init (full fine-tuning), each stage's relative weight change ``||w - w0|| / ||w0||`` and the
  linear CKA of its output on fixed validation images before vs after fine-tuning (Raghu et al. 2019), mean over
  seeds (the runs' ``transfer`` field, :mod:`medpretrain.transfer`);
* **reinit:<k> sweep**: test AUC and steps to 95% of the best validation AUC when only the lowest k stages are
  kept from the init (``full``: all of them);
* **convergence**: steps and seconds to 95% of the best validation AUC, full fine-tuning, per init;
* **comparisons with scratch**: each init's configuration chosen on validation (regime of the sweep) against
  scratch's, and the full-fine-tuning cells against each other, with :func:`medpretrain.report.compare_arms`
  (paired bootstrap over the test cases of the seed-averaged predictions, combined with the seed spread with t
  quantiles). Comparisons across architectures (``@lite0``) are marked as such.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medpretrain.pipeline.experiment import experiment_cells
from medpretrain.report import (
    _cells,
    compare_arms,
    plot_reuse,
    plot_reuse_k,
    recommend,
    reuse_k_rows,
    reuse_rows,
    summarize,
)
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
EXPERIMENTS = ("transfer_pneumonia", "transfer_busi")
METRIC = "auc"


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pm(agg: Mapping[str, float], nd: int = 3) -> str:
    sd = agg.get("std", math.nan)
    return f"{_f(agg.get('mean'), nd)} ± {_f(sd, nd)}" if math.isfinite(sd) else _f(agg.get("mean"), nd)


def verdict(ci: Sequence[float]) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no CI"
    return "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"


def arch_of(init: str) -> str:
    return init.partition("@")[2] or "resnet18"


def analyse(name: str, exp_dir: Path, plots: Path) -> dict[str, Any]:
    """Every section of one experiment as JSON-ready fields (plots written under ``plots``)."""
    exp, cells = experiment_cells(exp_dir)
    done = [c for c in cells if c.get("status") == "complete"]
    if not done:
        raise SystemExit(f"error: {exp_dir}: no complete fine-tune cell (run the experiment first)")
    budgets = sorted({float(c["label_fraction"]) for c in done})
    b = budgets[0]
    rows = summarize(done, headline=METRIC)
    reuse = [r for r in reuse_rows(done, b) if r["regime"] == "full"]
    sweep = reuse_k_rows(rows, b, METRIC)
    out: dict[str, Any] = {"experiment": name, "dir": str(exp_dir), "budget": b, "n_cells": len(done),
                           "unavailable": sorted({str(c["init_label"]) for c in cells if c["status"] == "unavailable"}),
                           "failed_cells": [{"init": s["init"], "regime": s["regime"], "cause": s["failed"]}
                                            for s in rows if s["failed"]],
                           "wall_s": float(exp.get("compute_s") or 0.0), "machine": exp.get("machine") or {}, "reuse": reuse, "sweep": sweep}
    if reuse:
        out["reuse_plot"] = str(plot_reuse(reuse, plots / f"{name}_reuse.png"))
    if sweep:
        out["sweep_plot"] = str(plot_reuse_k(sweep, plots / f"{name}_reinit_sweep.png", METRIC))
    out["convergence"] = [{"init": s["init"], "steps_to_95": s["steps_to_95"], "seconds_to_95": s["seconds_to_95"],
                           "best_epoch": s["best_epoch"], "test": s["metrics"][METRIC], "n": s["n"]}
                          for s in sorted(rows, key=lambda s: s["init"])
                          if s["regime"] == "full" and s["label_fraction"] == b and not s["failed"]]
    runs = _cells(done)
    full = {init: r for (init, regime, frac, _), r in runs.items() if regime == "full" and frac == b}
    ranking = recommend(done, METRIC)[0]["ranking"]
    chosen = {a["init"]: a for a in ranking}
    comparisons = []
    if "scratch" in full:
        for init in sorted(full):
            if init == "scratch":
                continue
            cross_arch = arch_of(init) != "resnet18"
            entry: dict[str, Any] = {"init": init, "vs": "scratch", "cross_architecture": cross_arch}
            entry["full"] = compare_arms(full[init], full["scratch"], METRIC)
            if init in chosen and "scratch" in chosen:
                a, s = chosen[init], chosen["scratch"]
                key_a = (init, a["regime"], b, -1.0 if a["lr"] is None else a["lr"])
                key_s = ("scratch", s["regime"], b, -1.0 if s["lr"] is None else s["lr"])
                entry["chosen"] = {"regime": a["regime"], "scratch_regime": s["regime"],
                                   **compare_arms(runs[key_a], runs[key_s], METRIC)}
            comparisons.append(entry)
    out["comparisons"] = comparisons
    out["ranking"] = ranking
    return out


def markdown(parts: Sequence[Mapping[str, Any]], note: str, base: Path) -> str:
    lines = ["# Why a transfer helps: feature reuse, reinit sweep, convergence, cross-domain supervised transfer", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/transfer_report.py` "
             f"(code {code_version()}) from the runs of the experiments below (nothing re-run). {note}".rstrip(), "",
             "Weight change: `||w - w0|| / ||w0||` of each stage between init and fine-tuned model; CKA: linear CKA of "
             "the stage's output on fixed validation images before vs after fine-tuning (1 = representation "
             "unchanged). Gaps: test AUC minus scratch's, paired bootstrap over the test cases of the seed-averaged "
             "predictions combined with the seed spread (t quantiles), 95% CI; *chosen*: each init's regime chosen "
             "on validation among full and reinit:<k>.", ""]
    for p in parts:
        b = p["budget"]
        lines += [f"## {p['experiment']} ({b:g} of the labels; {p['n_cells']} complete cells, experiment wall clock "
                  f"{p['wall_s'] / 60:.1f} min of stages on {p['machine'].get('cpu_count', '?')} x {p['machine'].get('cpu', '?')}, "
                  f"torch {p['machine'].get('torch', '?')}, runs at {p['machine'].get('code_version', '?')})", ""]
        if p["failed_cells"]:
            lines += [f"Failed cells (no finding): {p['failed_cells']}", ""]
        if p["unavailable"]:
            lines += [f"Unavailable arms: {', '.join(p['unavailable'])}", ""]
        lines += ["### Comparisons with scratch (ResNet-18 unless marked)", "",
                  "| init | full: test AUC gap [95% CI] | verdict | chosen regime | chosen: gap [95% CI] | verdict |",
                  "|---|---|---|---|---|---|"]
        for c in p["comparisons"]:
            f, ch = c["full"], c.get("chosen")
            tag = " (other architecture)" if c["cross_architecture"] else ""
            cells = [f"{c['init']}{tag}", f"{f['gap']:+.3f} [{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}]", verdict(f["ci"])]
            if ch:
                cells += [f"{ch['regime']} (scratch: {ch['scratch_regime']})",
                          f"{ch['gap']:+.3f} [{ch['ci'][0]:+.3f}, {ch['ci'][1]:+.3f}]", verdict(ch["ci"])]
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "### Convergence (full fine-tuning)", "",
                  "| init | test AUC | steps to 95% of best val AUC | seconds to 95% | best period | seeds |",
                  "|---|---|---|---|---|---|"]
        for c in p["convergence"]:
            lines.append(f"| {c['init']} | {_pm(c['test'])} | {_pm(c['steps_to_95'], 0)} | "
                         f"{_pm(c['seconds_to_95'], 1)} | {_pm(c['best_epoch'], 1)} | {c['n']} |")
        if p["reuse"]:
            lines += ["", "### Where the features are reused (full fine-tuning; weight change / CKA per stage)", ""]
            for r in p["reuse"]:
                lines.append(f"- **{r['init']}** ({r['n']} seeds): " + ", ".join(
                    f"{s} {w:.3f} / {k:.2f}" for s, w, k in zip(r["stages"], r["weight_change"], r["cka"],
                                                                 strict=True)))
            lines += ["", f"![reuse]({Path(p['reuse_plot']).relative_to(base)})"]
        if p["sweep"]:
            lines += ["", "### reinit:<k> sweep (keep the lowest k stages of the init, re-initialise the rest)", "",
                      "| init | k | test AUC | steps to 95% |", "|---|---|---|---|"]
            for r in p["sweep"]:
                lines.append(f"| {r['init']} | {'full' if r['k'] is None else r['k']} | {_pm(r['metric'])} | "
                             f"{_pm(r['steps_to_95'], 0)} |")
            lines += ["", f"![sweep]({Path(p['sweep_plot']).relative_to(base)})"]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="?", default=str(PROJECT_ROOT / "runs" / "experiments"),
                    help="the experiments' out_dir (default: runs/experiments)")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--out", default=str(RESULTS / "transfer_analysis.md"))
    ap.add_argument("--note", default="", help="a sentence on how the runs were made (machine load, commit)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    plots = out.parent / out.stem
    plots.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in args.experiments:
        exp_dir = Path(args.runs).resolve() / name  # the cells' config hash holds the absolute runs_dir
        if not (exp_dir / "experiment.json").is_file():
            raise SystemExit(f"error: {exp_dir}/experiment.json not found (run "
                             f"`python scripts/run_experiment.py configs/experiments/{name}.yaml` first)")
        parts.append(analyse(name, exp_dir, plots))
    atomic_write_text(out, markdown(parts, args.note, out.parent))
    atomic_write_text(out.with_suffix(".json"), json.dumps(parts, indent=1, default=str))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
