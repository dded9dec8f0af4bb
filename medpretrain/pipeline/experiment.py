"""An experiment: which stages run, with which config each, and the one call that runs them all.

The schema :data:`ExperimentConfig` (``configs/experiments/*.yaml``) has one :class:`StageSpec` section per
registered training stage (:func:`medpretrain.methods.registry.stages`): a method registered later gets its
section (``byol: {enabled: true}``) with no edit here. Stages run in order, each launched as its own process
group with the experiment's launcher:

1. the training stages (self-supervised first, then generative): one contract checkpoint each, in
   ``<out>/<stage>/<hash>/backbone.safetensors`` (:func:`.stages.train_stage`), or a generator-only stage's
   image model (``ddpm``: ``unet.safetensors``, sampled and audited, never a grid arm);
2. ``samples`` + ``audit``: images drawn from each generator and scored by ``scripts/audit_synthetic.py``;
3. ``classification`` / ``segmentation``: the fine-tune grid (:mod:`.grid`) over every init (``scratch``,
   ``imagenet`` and the exports above, each named after its stage);
4. ``report.md`` and ``experiment.json`` (:mod:`.report`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medpretrain.config import ConfigError, load_config, save_config
from medpretrain.finetune import output_dir
from medpretrain.methods import registry
from medpretrain.pipeline.console import Console, say
from medpretrain.pipeline.grid import cell_config, grid, grid_report, previous
from medpretrain.pipeline.report import write_report
from medpretrain.pipeline.schema import (  # noqa: F401  (the schema, re-exported for callers)
    DEFAULT_ENABLED,
    GRID_TASKS,
    AuditSpec,
    ExperimentConfig,
    GridSpec,
    LaunchSpec,
    StageSpec,
    VariantSpec,
    _experiment_config,
)
from medpretrain.pipeline.stages import (
    Stage,
    check_backbone_refs,
    grid_config,
    grid_stage,
    record,
    sample_and_audit,
    schema_keys,
    schema_of,
    top_key,
    train_stage,
    variant_label,
    variant_note,
)
from medpretrain.results import RunResult
from medpretrain.utils import PROJECT_ROOT, code_version


def check_variants(cfg: Any, trained: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a variant without a usable name, a name used twice, or a stage that is not
    an enabled training stage."""
    seen: set[str] = set()
    for i, v in enumerate(cfg.variants):
        if not v.name or any(c in v.name for c in "/=|@ ") or v.name in seen:
            raise ConfigError(f"variants[{i}].name={v.name!r}: give each variant its own short name "
                              "(no '/', '=', '|', '@' or spaces)")
        seen.add(v.name)
        for name in v.stages:
            if name not in trained or not getattr(cfg, name).enabled:
                raise ConfigError(f"variants[{v.name}].stages has {name!r}, not an enabled training stage "
                                  f"(enabled: {[n for n in trained if getattr(cfg, n).enabled]})")
        for init in v.inits:
            if init in trained and init not in v.stages:
                raise ConfigError(f"variants[{v.name}].inits has {init!r}: add it to variants[{v.name}].stages")
        from medpretrain.finetune import FinetuneConfig

        schemas = [FinetuneConfig, *(schema_of(registry.stage(n)) for n in v.stages)]
        takers = [t for t in schemas if t is not None]
        if len(takers) < len(schemas):
            continue  # a stage without a schema takes every override
        known = set().union(*(schema_keys(t) for t in takers))
        for o in v.overrides:
            if top_key(o) is not None and top_key(o) not in known:
                raise ConfigError(f"variants[{v.name}].overrides has {o!r}: neither the fine-tune cells nor the "
                                  f"variant's stages ({', '.join(v.stages) or 'none'}) have a {top_key(o)!r} group")


def run_experiment(cfg: Any, console: Console = None) -> Path:
    """Run (or, with ``cfg.dry_run``, plan) every enabled stage of experiment ``cfg`` and write its report.

    Returns the report's path (the experiment folder for a dry run). Raises
    :class:`medpretrain.pipeline.stages.StageFailed` when a stage fails (run again to resume) and
    :class:`ConfigError` for an inconsistent experiment (a grid or audit naming a disabled stage).
    """
    exp_dir = (PROJECT_ROOT / cfg.out_dir / cfg.name).resolve()
    from medpretrain.generative.sampling import MIXES  # the package imports diffusers: only when running

    if cfg.audit.mix not in MIXES:
        raise ConfigError(f"audit.mix must be one of {', '.join(MIXES)}, got {cfg.audit.mix!r}")
    started = time.time()
    code_version()  # the code this process runs, recorded by every in-process cell and the report
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

    trained = registry.all_stages()
    check_backbone_refs(cfg)  # first: a variant's generator-only init is refused for what it is
    check_variants(cfg, trained)
    for variant in [None, *cfg.variants]:
        for name in (variant.stages if variant else [n for n in trained if getattr(cfg, n).enabled]):
            label = variant_label(name, variant)
            exports[label] = []
            for seed in getattr(cfg, name).seeds or [None]:
                say(console, f"[experiment] {label}{'' if seed is None else f' (seed {seed})'} ...")
                exports[label].append(train_stage(cfg, exp_dir, name, console, seed=seed, variant=variant))
                done(exports[label][-1])

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
            grids[task] = []
            for variant in [None, *cfg.variants]:
                say(console, f"[experiment] {variant_label(task, variant)} grid ...")
                stage, results = grid_stage(cfg, exp_dir, task, exports, console, variant=variant)
                grids[task] += results
                done(stage)
            if cfg.variants and grids[task]:  # one report over every arm of the task, variants included
                report = grid_report(grid_config(cfg, exp_dir, task, exports), grids[task],
                                     notes=[variant_note(v) for v in cfg.variants])
                say(console, f"[experiment] {task}: every arm in {report}")

    if cfg.dry_run:
        return exp_dir
    report = write_report(cfg, exp_dir, stages, grids, started)
    say(console, f"[experiment] report: {report} ({(time.time() - started) / 60:.1f} min)")
    return report


def experiment_cells(exp_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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
