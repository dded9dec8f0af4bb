"""The experiment report: ``<exp_dir>/report.md`` (which init at each label budget and how sure, the audit
table, the stage table) and ``experiment.json`` beside it (machine, stages, recommendations, summaries), and
README's results section generated from ``experiment.json`` files (:func:`publish_readme`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpretrain.cli import UserError
from medpretrain.pipeline.stages import Stage, synthetic_override
from medpretrain.report import (
    SEG_PLOTS,
    as_mappings,
    budget,
    compare_arms,
    cross_dataset_markdown,
    cross_dataset_rows,
    efficiency_markdown,
    recommend,
    recommendation_markdown,
    run_regime,
    seg_details,
    seg_details_markdown,
    summarize,
)
from medpretrain.results import RunResult, headline_metric
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version, cpu_model

if TYPE_CHECKING:
    from medpretrain.pipeline.schema import ExperimentConfig


def machine() -> dict[str, Any]:
    """Python, torch and library versions, CPU, GPU and code version, for the report."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "cuda": torch.cuda.is_available(), "code_version": code_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("accelerate", "lightly", "monai", "torchmetrics", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional library missing is a fact for the report, not an error
            info[mod] = None
    return info


def _probe_cell(a: dict[str, Any]) -> str:
    """The fixed-budget discriminator loss (real-vs-real baseline); ``-`` for audits written before it existed."""
    probe = a.get("probe")
    if not probe:
        return "-"
    return f"{probe['fake']['loss']:.3f} ({probe['real_baseline']['loss']:.3f})"


def _audit_cells(a: dict[str, Any]) -> list[str]:
    """Realism AUC, fixed-budget discriminator loss, FID / KID / precision / recall (fake, and the real-vs-real
    baseline), memorised count."""
    disc, fk, rb, memo = a["discriminator"], a["distribution"]["fake"], a["distribution"]["real_baseline"], \
        a["memorisation"]
    lo, hi = disc["auc_ci95"]
    return [f"{disc['auc']:.3f} [{lo:.3f}, {hi:.3f}]", _probe_cell(a), f"{fk['fid']:.2f} ({rb['fid']:.2f})",
            f"{fk['kid']:.4f} ({rb['kid']:.4f})", f"{fk['precision']:.3f} ({rb['precision']:.3f})",
            f"{fk['recall']:.3f} ({rb['recall']:.3f})", f"{memo['n_flagged']} / {a['fake']['n_used']}"]


def synthetic_comparisons(cfg: ExperimentConfig, results: Sequence[RunResult | dict[str, Any]],
                          metric: str = "auc") -> list[dict[str, Any]]:
    """Every arm ``<init>@<variant>`` of a variant whose overrides set ``data.synthetic`` against the same init
    without it (``<init>``), in each regime and label budget where both have complete cells: the gap of the
    test ``metric`` (synthetic minus real only) with :func:`medpretrain.report.compare_arms` (paired bootstrap of
    the seed-averaged predictions + the seed spread), unadjusted for multiplicity. Rows: ``arm``, ``base``,
    ``synthetic`` (the override's value), ``regime``, ``budget``, ``arm_mean``, ``base_mean``, ``n``, and the
    comparison's ``gap``, ``ci``, ``p_value``, ``test``; ``verdict`` ``helps`` / ``hurts`` (the CI excludes 0) or
    ``not distinguishable``."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in as_mappings(results):
        if r.get("status") == "complete" and not r.get("evaluated_from"):
            cells.setdefault((str(r["init_label"]), run_regime(r), budget(r)), []).append(dict(r))
    rows = []
    for v in getattr(cfg, "variants", None) or []:  # a report of a plain grid has no variants
        found = synthetic_override(list(v.overrides))
        if found is None or not found[2]:
            continue
        arms = sorted({k[0] for k in cells if k[0].endswith(f"@{v.name}")})
        for arm in arms:
            base = arm.removesuffix(f"@{v.name}")
            for (init, regime, b), runs in sorted(cells.items()):
                other = cells.get((base, regime, b))
                if init != arm or not other:
                    continue
                runs, other = sorted(runs, key=lambda r: r["seed"]), sorted(other, key=lambda r: r["seed"])
                cmp = compare_arms(runs, other, metric)
                lo, hi = cmp["ci"]
                rows.append({"arm": arm, "base": base, "synthetic": found[2], "regime": regime, "budget": b,
                             "metric": metric, "n": [len(runs), len(other)],
                             "arm_mean": float(sum(r["metrics"]["test"][metric] for r in runs) / len(runs)),
                             "base_mean": float(sum(r["metrics"]["test"][metric] for r in other) / len(other)),
                             "gap": cmp["gap"], "ci": cmp["ci"], "se": cmp["se"], "p_value": cmp["p_value"], "test": cmp["test"],
                             "verdict": "helps" if lo > 0 else "hurts" if hi < 0 else "not distinguishable"})
    return rows


def synthetic_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's "<init> + synthetic - <init>" table of :func:`synthetic_comparisons` rows (empty: none)."""
    if not rows:
        return []
    name = rows[0]["metric"].upper()
    md = ["## Do synthetic images help?", "",
          f"Test {name} of each arm trained with synthetic images added to its labelled training images (the "
          "variant's `data.synthetic`) minus the same init without them, same regime, label budget and seeds; gap "
          "[95% CI] from the paired bootstrap of the seed-averaged predictions and the seed spread (not adjusted "
          "for multiplicity).", "",
          f"| comparison | synthetic | regime | label fraction | test {name} with | without | gap [95% CI] | p | "
          "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci"]
        md.append(f"| {r['arm']} - {r['base']} | `{r['synthetic']}` | {r['regime']} | {r['budget']:g} | "
                  f"{r['arm_mean']:.3f} (n={r['n'][0]}) | {r['base_mean']:.3f} (n={r['n'][1]}) | "
                  f"{r['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['p_value']:.2g} | {r['verdict']} |")
    return [*md, ""]


def write_report(cfg: ExperimentConfig, exp_dir: Path, stages: list[Stage], grid_results: dict[str, list[RunResult]],
                 started: float) -> Path:
    """Write ``report.md`` and ``experiment.json`` into ``exp_dir``; return the report's path.

    ``grid_results``: every cell's results per grid task; ``started``: ``time.time()`` when this invocation began.
    """
    grids = {task: [r.to_dict() for r in results] for task, results in grid_results.items()}
    info = machine()
    md = [f"# {cfg.title or cfg.name}", ""]
    if cfg.description:
        md += [cfg.description.strip(), ""]
    computed = sum(s.wall_s for s in stages)
    md += [f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/run_experiment.py` "
           f"(experiment `{cfg.name}`). Machine: {info['cpu_count']} CPU cores"
           + (f", {info['gpu']}" if info.get("gpu") else ", no GPU")
           + f"; {info['platform']}; Python {info['python']}, torch {info['torch']}, accelerate {info['accelerate']}, "
           f"lightly {info['lightly']}, monai {info['monai']}; code {info['code_version']}. "
           f"Compute time of all stages: {computed / 60:.1f} min (this invocation: "
           f"{(time.time() - started) / 60:.1f} min).", ""]
    recommendations = {task: recommend(results) for task, results in grids.items() if results}
    details = {task: [{k: v for k, v in d.items() if k != "per_image"} for d in seg_details(results)]
               for task, results in grids.items() if results and task == "segmentation"}
    for task, results in grids.items():
        if not results:
            continue
        rows = recommendations[task]
        md += [f"## Which initialisation? ({task})", ""]
        md += recommendation_markdown(rows, seg=task == "segmentation")
        metric = headline_metric(task)
        md += ["", f"Test {'Dice' if metric == 'dice' else metric.upper()} by init, regime and label budget "
               "(mean ± sd over seeds, n = seeds):", ""]
        md += efficiency_markdown(summarize(results, headline=metric), metric, seg=task == "segmentation")
        if task == "segmentation":
            md += ["", "Per-image test Dice, pixel AUC, the threshold chosen on validation and the optimiser steps:",
                   "", *seg_details_markdown(details[task])]
            plots = [f"![{p.removesuffix('.png')}](reports/{task}/{p})" for p in SEG_PLOTS
                     if (exp_dir / "reports" / task / p).is_file()]
            md += ["", *plots] if plots else []
        cross = cross_dataset_markdown(cross_dataset_rows(results))
        md += ["", *cross] if cross else []
        md += ["", f"Full comparison, label-efficiency curves and plots: [reports/{task}/report.md]"
                   f"(reports/{task}/report.md).", "",
               f"![label efficiency](reports/{task}/label_efficiency.png)", ""]
    synthetic = synthetic_comparisons(cfg, grid_results.get("classification", []))
    md += synthetic_markdown(synthetic)
    audits = {s.name.removeprefix("audit_"): s for s in stages
              if s.name.startswith("audit_") and Path(s.output).with_name("audit.json").is_file()}
    if audits:
        from medpretrain.audit import RANKING_RULE, rank_audits

        loaded = {g: json.loads(Path(s.output).with_name("audit.json").read_text()) for g, s in audits.items()}
        md += ["## Synthetic images (audit)", "",
               "Cross-fitted real-vs-fake discriminator AUC [95% CI] (0.5 = indistinguishable); fixed-budget "
               "discriminator loss in nats (ln 2 = 0.693 is chance; it keeps ordering generators whose AUC is "
               "1.000); distribution metrics in the feature space of the audit backbone, fake vs real with the "
               f"real-vs-real baseline in brackets. Best first: {RANKING_RULE}.",
               "", "| generator | real-vs-fake AUC | fixed-budget D loss | FID | KID | precision | recall | memorised "
               "| report |", "|---|---|---|---|---|---|---|---|---|"]
        for g in rank_audits(loaded):
            md.append("| " + " | ".join([g, *_audit_cells(loaded[g]),
                                         f"[audit.md]({Path(audits[g].output).relative_to(exp_dir)})"]) + " |")
        md.append("")
    md += ["## Stages", "", "| stage | status | wall-clock | output | config hash |", "|---|---|---|---|---|"]
    for s in stages:
        out = Path(s.output)
        shown = out.relative_to(exp_dir) if out.is_relative_to(exp_dir) else out
        md.append(f"| {s.name} | {s.status}{' (' + s.detail + ')' if s.detail else ''} | {s.wall_s / 60:.1f} min "
                  f"| `{shown}` | `{s.hash}` |")
    md += ["", "Status: *run* computed now, *resumed* continued from a checkpoint, *reused* found done with the same "
           "config and data. Wall-clock is the time the stage took when it was computed. Settings: "
           "`experiment.yaml` in this folder.", ""]
    path = exp_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    summary = {"name": cfg.name, "title": cfg.title, "machine": info, "compute_s": computed,
               "invocation_s": time.time() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "stages": [dataclasses.asdict(s) for s in stages],
               "recommendations": recommendations, "segmentation_details": details, "synthetic": synthetic,
               "summary": {t: {"metric": headline_metric(t), "rows": summarize(r, headline=headline_metric(t))}
                           for t, r in grids.items() if r}}
    atomic_write_text(exp_dir / "experiment.json", json.dumps(summary, indent=2, default=str) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# README's results section (scripts/publish_results.py)
# --------------------------------------------------------------------------------------------

README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_section(exp_dir: Path, assets: Path = PROJECT_ROOT / "docs" / "results") -> list[str]:
    """The README lines for one experiment folder (from its ``experiment.json``): the question, the
    recommendation and label-efficiency tables, the plot (copied to ``assets/<name>/``), the audit summary,
    machine, versions and compute time. Raises ``FileNotFoundError`` / :class:`UserError` when the experiment
    has no readable ``experiment.json``."""
    path = exp_dir / "experiment.json"
    try:
        exp = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; run scripts/run_experiment.py for it first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e}); run scripts/run_experiment.py for it again") from None
    m = exp["machine"]
    name = exp["name"]
    md = [f"### {exp['title'] or name}", ""]
    md.append(f"`python scripts/run_experiment.py configs/experiments/{name}.yaml` - report written {exp['created'][:16]} "
              f"UTC on {m['cpu_count']} CPU cores" + (f" + {m['gpu']}" if m.get("gpu") else ", no GPU")
              + f"; torch {m['torch']}, accelerate {m['accelerate']}, lightly {m['lightly']}, monai {m['monai']}; "
              f"code {m['code_version']}. Compute time of all stages: {exp['compute_s'] / 60:.0f} min.")
    md.append("")
    for task, rec in exp.get("recommendations", {}).items():
        seg = task == "segmentation"
        md += recommendation_markdown(rec, seg=seg)
        summary = exp["summary"][task]
        md += ["", f"Test {'Dice' if summary['metric'] == 'dice' else summary['metric'].upper()} "
                   "(mean ± sd over seeds):", ""]
        md += efficiency_markdown(summary["rows"], summary["metric"], seg=seg)
        if seg and exp.get("segmentation_details", {}).get(task):
            md += ["", "Per-image test Dice, pixel AUC, threshold (validation) and optimiser steps:", "",
                   *seg_details_markdown(exp["segmentation_details"][task])]
        plot = exp_dir / "reports" / task / "label_efficiency.png"
        if plot.is_file():
            dest = assets / name / f"{task}_label_efficiency.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, dest)
            shown = dest.relative_to(PROJECT_ROOT) if dest.is_relative_to(PROJECT_ROOT) else dest
            md += ["", f"![{name} label efficiency]({shown})"]
        md.append("")
    audits = [s for s in exp["stages"] if s["name"].startswith("audit_")]
    for s in audits:
        a = json.loads(Path(s["output"]).with_name("audit.json").read_text())
        d, fk, rb = a["discriminator"], a["distribution"]["fake"], a["distribution"]["real_baseline"]
        p = a.get("probe")
        probe = (f"fixed-budget discriminator loss {p['fake']['loss']:.3f} nats (real vs real "
                 f"{p['real_baseline']['loss']:.3f}), " if p else "")
        md.append(f"- Synthetic {s['name'].removeprefix('audit_').upper()} images: real-vs-fake AUC {d['auc']:.3f} "
                  f"(0.5 = indistinguishable), {probe}FID {fk['fid']:.2f} (real vs real {rb['fid']:.2f}), "
                  f"{a['memorisation']['n_flagged']} of {a['fake']['n_used']} flagged as near-copies.")
    if audits:
        md.append("")
    return md


KEPT = "Kept from an earlier publication"


def experiment_sections(markdown: str, level: str = "###") -> dict[str, str]:
    """The ``level`` sections of a results report (README's block: ``###``; ``benchmarks/results/*.md``: ``##``),
    by the experiment whose run line opens them (``python scripts/run_experiment.py
    configs/experiments/<name>.yaml``, as :func:`readme_section` and ``benchmarks/protocol_report.py`` write it).

    A section ends where the next one at that level starts; the marker line of a kept section that follows it
    (``> Kept from an earlier publication ...``, :func:`keep_marker`) and README's end marker are not part of it,
    so keeping a section twice does not pile up markers."""
    out: dict[str, str] = {}
    for part in markdown.split(f"\n{level} ")[1:]:
        _, _, rest = part.partition("\n\n")
        m = re.match(r"`python scripts/run_experiment.py configs/experiments/([\w.-]+)\.yaml`", rest)
        if m:
            text = re.sub(rf"\n> (?:{KEPT}|[\w.-]+: its runs are not on this machine)[^\n]*", "",
                          part.split("\n" + README_END)[0])  # the second: protocol_report's marker before 5f160e4
            out[m.group(1)] = f"{level} " + text.rstrip("\n")
    return out


def keep_marker(name: str, why: str) -> str:
    """The quoted line above a section kept verbatim from an earlier report (:func:`experiment_sections` drops it
    when the report is read again)."""
    return f"> {KEPT} of `{name}` ({why})."


def publish_readme(readme: Path, exp_dirs: list[Path], notes: Sequence[str] = (),
                   assets: Path = PROJECT_ROOT / "docs" / "results", keep: bool = True) -> Path:
    """Replace the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in ``readme`` with the
    :func:`readme_section` of each experiment folder (``notes`` quoted above them). With ``keep``, the sections
    of other experiments already there stay, verbatim, after the new ones under a line that says so (their runs
    need not be on this machine). Raises :class:`UserError` when the markers are missing."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{readme}: no {README_BEGIN} ... {README_END} markers to replace")
    head, rest = text.split(README_BEGIN, 1)
    old_block, tail = rest.split(README_END, 1)
    md = [README_BEGIN, "", "Generated by `scripts/publish_results.py` from the runs' `experiment.json`; the full "
          "reports are in `runs/experiments/<name>/report.md` after a run.", "", *[f"> {n}" for n in notes],
          *([""] if notes else [])]
    published: set[str] = set()
    for d in exp_dirs:
        lines = readme_section(d, assets)
        md += lines
        published |= set(experiment_sections("\n" + "\n".join(lines)))
    if keep:
        for name, text in experiment_sections(old_block).items():
            if name not in published:
                md += [keep_marker(name, "not re-published here"), "", text, ""]
    md.append(README_END)
    atomic_write_text(readme, head + "\n".join(md) + tail)
    return readme
