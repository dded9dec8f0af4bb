"""An experiment: which stages run, with which config each, and the one call that runs them all.

The schema :data:`ExperimentConfig` (``configs/experiments/*.yaml``) has one :class:`StageSpec` section per
registered training stage (:func:`medpretrain.methods.registry.stages`): a method registered later gets its
section (``byol: {enabled: true}``) with no edit here. Stages run in order, each launched as its own process
group with the experiment's launcher:

1. the training stages (self-supervised first, then generative): one contract checkpoint each, in
   ``<out>/<stage>/<hash>/backbone.safetensors`` (:func:`.stages.train_stage`);
2. ``samples`` + ``audit``: images drawn from each generator and scored by ``scripts/audit_synthetic.py``;
3. ``classification`` / ``segmentation``: the fine-tune grid (:mod:`.grid`) over every init (``scratch``,
   ``imagenet`` and the exports above, each named after its stage);
4. ``report.md`` and ``experiment.json`` (:mod:`.report`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medpretrain.config import ConfigError, save_config
from medpretrain.methods import registry
from medpretrain.pipeline.console import Console, say
from medpretrain.pipeline.report import write_report
from medpretrain.pipeline.schema import (  # noqa: F401  (the schema, re-exported for callers)
    DEFAULT_ENABLED,
    GRID_TASKS,
    AuditSpec,
    ExperimentConfig,
    GridSpec,
    LaunchSpec,
    StageSpec,
    _experiment_config,
)
from medpretrain.pipeline.stages import Stage, grid_stage, record, sample_and_audit, train_stage
from medpretrain.results import RunResult
from medpretrain.utils import PROJECT_ROOT


def run_experiment(cfg: Any, console: Console = None) -> Path:
    """Run (or, with ``cfg.dry_run``, plan) every enabled stage of experiment ``cfg`` and write its report.

    Returns the report's path (the experiment folder for a dry run). Raises
    :class:`medpretrain.pipeline.stages.StageFailed` when a stage fails (run again to resume) and
    :class:`ConfigError` for an inconsistent experiment (a grid or audit naming a disabled stage).
    """
    exp_dir = (PROJECT_ROOT / cfg.out_dir / cfg.name).resolve()
    started = time.time()
    say(console, f"[experiment] {cfg.name}: {exp_dir}" + (" (dry run)" if cfg.dry_run else ""))
    if not cfg.dry_run:
        exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir, name="experiment.yaml")

    stages: list[Stage] = []
    exports: dict[str, list[Stage]] = {}  # a training stage's replicates (one per seed of its section)

    def done(stage: Stage) -> None:
        stages.append(stage)
        say(console, f"[experiment] {stage.name}: {stage.status}{' - ' + stage.detail if stage.detail else ''} "
                     f"({stage.wall_s:.0f} s) -> {stage.output}")
        if not cfg.dry_run:
            record(exp_dir, stage)

    trained = registry.stages()
    for name in trained:
        if getattr(cfg, name).enabled:
            exports[name] = []
            for seed in getattr(cfg, name).seeds or [None]:
                say(console, f"[experiment] {name}{'' if seed is None else f' (seed {seed})'} ...")
                exports[name].append(train_stage(cfg, exp_dir, name, console, seed=seed))
                done(exports[name][-1])

    if cfg.audit.enabled:
        feat = cfg.audit.features
        if feat in trained:
            if feat not in exports:
                raise ConfigError(f"audit.features={feat!r} but stage {feat} is not enabled")
            feat = exports[feat][0].output  # the first replicate
        generators = registry.generators()
        for gen in cfg.audit.generators or [g for g in generators if g in exports]:
            if gen not in generators:
                raise ConfigError(f"audit.generators: {gen!r} is not a generator stage ({list(generators)})")
            if gen in exports:
                say(console, f"[experiment] samples + audit of {gen} ...")
                for s in sample_and_audit(cfg, exp_dir, gen, exports[gen][0], feat, console):
                    done(s)

    grids: dict[str, list[RunResult]] = {}
    for task in GRID_TASKS:
        if getattr(cfg, task).enabled:
            say(console, f"[experiment] {task} grid ...")
            stage, grids[task] = grid_stage(cfg, exp_dir, task, exports, console)
            done(stage)

    if cfg.dry_run:
        return exp_dir
    report = write_report(cfg, exp_dir, stages, grids, started)
    say(console, f"[experiment] report: {report} ({(time.time() - started) / 60:.1f} min)")
    return report
