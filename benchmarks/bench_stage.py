"""Time one training stage of an experiment on its own (issue 17: each generator at most 20 minutes on this CPU).

    python benchmarks/bench_stage.py experiment=configs/experiments/generative_busi.yaml stage=ddpm

An experiment's stage records (``experiment.json``) hold the wall-clock of whatever ran beside them; this runs the
one stage again, exactly as ``scripts/run_experiment.py`` runs it (:func:`medpretrain.pipeline.stages.train_stage`:
the same config, command and launcher, so the same stage hash), into a scratch folder (``work_dir``, never the
experiment's own folder, and emptied first so nothing is reused or resumed). It writes
``benchmarks/results/stage_<experiment>_<stage>.{json,md}``: the wall-clock against ``budget_min``, the stage
hash, the load average before and after (another job on the machine shows there), machine, versions, commit.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medpretrain.config import ConfigError, load_config
from medpretrain.methods import registry
from medpretrain.pipeline.experiment import ExperimentConfig
from medpretrain.pipeline.stages import train_stage
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version, cpu_model


@dataclass
class BenchStageConfig:
    experiment: str = "configs/experiments/generative_busi.yaml"
    stage: str = "ddpm"
    """A training stage of the experiment (a pretraining or generative method: simclr, vae, dcgan, ddpm ...)."""
    budget_min: float = 20.0
    """The wall-clock the stage must fit (issue 17: 20 minutes per generator)."""
    work_dir: str = "runs/bench_stage"
    out_dir: str = "benchmarks/results"
    note: str = ""
    """A line quoted under the title (what else ran on the machine, for instance)."""


def last_step(metrics: Path) -> int | None:
    """The ``step`` of the last row of a run's ``metrics.csv`` (pretraining stages write no results.json)."""
    if not metrics.is_file():
        return None
    rows = list(csv.DictReader(metrics.open()))
    return int(rows[-1]["step"]) if rows and rows[-1].get("step") else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchStageConfig, argv)
    exp_file = Path(cfg.experiment)
    exp_file = exp_file if exp_file.is_absolute() else PROJECT_ROOT / exp_file
    work = Path(cfg.work_dir)
    work = (work if work.is_absolute() else PROJECT_ROOT / work).resolve()
    exp = load_config(ExperimentConfig, ["--config", str(exp_file), f"out_dir={work}"])
    if cfg.stage not in registry.all_stages():
        raise ConfigError(f"stage={cfg.stage!r} is not a training stage; one of {sorted(registry.all_stages())}")
    exp_dir = work / exp.name
    shutil.rmtree(exp_dir / cfg.stage, ignore_errors=True)  # a fresh run: nothing reused or resumed
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    stage = train_stage(exp, exp_dir, cfg.stage)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    run_dir = Path(stage.output).parent
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    steps = results.get("steps", last_step(run_dir / "metrics.csv"))
    out = {
        "experiment": str(exp_file.relative_to(PROJECT_ROOT)) if exp_file.is_relative_to(PROJECT_ROOT) else str(exp_file),
        "stage": cfg.stage, "hash": stage.hash, "status": stage.status, "wall_s": wall,
        "budget_min": cfg.budget_min, "met": wall <= 60 * cfg.budget_min,
        "steps": steps, "train_wall_s": results.get("train_wall_s"),
        "overrides": list(getattr(exp, cfg.stage).overrides), "common": list(exp.common),
        "loadavg_before": list(load_before), "loadavg_after": list(load_after),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0]},
        "code": code_version(), "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "log": stage.log, "note": cfg.note,
    }
    dest = Path(cfg.out_dir)
    dest = dest if dest.is_absolute() else PROJECT_ROOT / dest
    dest.mkdir(parents=True, exist_ok=True)
    name = f"stage_{exp.name}_{cfg.stage}"
    atomic_write_text(dest / f"{name}.json", json.dumps(out, indent=2) + "\n")
    md = [f"# `{cfg.stage}` of `{out['experiment']}`, timed on its own", "",
          f"Written {out['written']} by `benchmarks/bench_stage.py` (code {out['code']}); {out['machine']['cpu']}, "
          f"{out['machine']['cores']} cores, torch {out['machine']['torch']}. The stage ran as "
          "`scripts/run_experiment.py` runs it (same config and command, same stage hash), into a scratch folder.", "",
          *([f"> {cfg.note}", ""] if cfg.note else []),
          "| stage | hash | steps | wall-clock (min) | budget (min) | met | load average before / after (1 min) |",
          "|---|---|---|---|---|---|---|",
          f"| {cfg.stage} | `{stage.hash}` | {out['steps'] if out['steps'] is not None else '-'} | {wall / 60:.1f} | "
          f"{cfg.budget_min:g} | {'yes' if out['met'] else '**no**'} | {load_before[0]:.2f} / {load_after[0]:.2f} |",
          "", f"Stage overrides: `{' '.join(out['overrides'])}`; common: `{' '.join(out['common'])}`.", ""]
    atomic_write_text(dest / f"{name}.md", "\n".join(md))
    print(f"{cfg.stage}: {wall / 60:.1f} min (budget {cfg.budget_min:g}) -> {dest / name}.md")
    return out


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
