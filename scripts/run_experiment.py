"""One command for a whole study: pretraining, generative models, fine-tune grids, audit, one report.

    python scripts/run_experiment.py configs/experiments/pneumonia.yaml
    python scripts/run_experiment.py configs/experiments/pneumonia.yaml dry_run=true          # plan only
    python scripts/run_experiment.py configs/experiments/drive_full.yaml \
        launch.config_file=configs/accelerate/multi_gpu.yaml                                 # N GPUs
    python scripts/run_experiment.py configs/experiments/tiny.yaml \
        launch.launcher=torchrun launch.args='[--nproc_per_node, 2]'                         # 2 CPU processes

An experiment file (``configs/experiments/*.yaml``, schema :class:`ExperimentConfig`) names the stages and
the config file + overrides of each. Stages, in order, each launched as its own process group with the
experiment's launcher (``accelerate launch --config_file configs/accelerate/<...>.yaml``, ``torchrun`` or
plain ``python``):

1. ``simclr``, ``moco`` (``pretrain/*.py``), ``vae``, ``dcgan`` (``generative/*.py``): one contract
   checkpoint each, in ``<out>/<stage>/<hash>/backbone.safetensors``;
2. ``samples`` + ``audit``: images drawn from each generator (``generative/sample.py``) and scored by
   ``scripts/audit_synthetic.py`` with a pretrained backbone;
3. ``classification`` / ``segmentation``: the fine-tune grid of ``scripts/compare.py`` over every init
   (``scratch``, ``imagenet`` and the exports above, each named after its stage);
4. ``report.md``: which init to use at each label budget and how sure that is, the stage table (run,
   resumed or reused, wall-clock), links to the grid reports and audits; ``experiment.json`` beside it.

Reuse and resume: a stage's folder is named by a hash of its script, config file, overrides and the
data files (paths, sizes, modification times; :func:`medpretrain.data.data_stamp`). A stage whose output
exists under that hash is reused, not recomputed; one with checkpoints but no output is resumed
(``train.resume=auto``); one that died before its first checkpoint starts again. Fine-tune cells are reused
by ``compare.py`` through their own config hash, which contains the checkpoint path and thus the
pretraining hash. So a killed experiment continues where it stopped: run the same command again.

Run it with ``python`` (it is the orchestrator; each stage starts its own processes). Under a
multi-process launcher it refuses with that advice instead of running N orchestrators.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pretrain/simclr.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import compare  # noqa: E402  (scripts/compare.py)

from medpretrain.config import (  # noqa: E402
    ConfigError,
    DataConfig,
    _merge,
    config_to_dict,
    load_config,
    parse_args,
    read_yaml,
    save_config,
)
from medpretrain.data import data_stamp  # noqa: E402
from medpretrain.report import (  # noqa: E402
    efficiency_markdown,
    recommend,
    recommendation_markdown,
    summarize,
)
from medpretrain.training import list_checkpoints  # noqa: E402
from medpretrain.utils import atomic_write_text, code_version, cpu_model  # noqa: E402

TRAIN_STAGES: dict[str, str] = {  # stage -> script; each exports <run>/backbone.safetensors
    "simclr": "pretrain/simclr.py",
    "moco": "pretrain/moco.py",
    "vae": "generative/vae.py",
    "dcgan": "generative/dcgan.py",
}
GENERATOR_FILES = {"vae": "decoder.safetensors", "dcgan": "generator.safetensors"}


@dataclass
class StageSpec:
    enabled: bool = True
    config: str = ""
    """The stage script's config file (default: ``configs/<stage>.yaml``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for the stage script, after ``common``."""


@dataclass
class GridSpec:
    enabled: bool = False
    config: str = "configs/compare.yaml"
    """A ``scripts/compare.py`` config (its ``base_config`` is the fine-tune config of every cell)."""
    inits: list[str] = field(default_factory=lambda: ["scratch", "imagenet", "simclr", "moco", "vae", "dcgan"])
    """``scratch``, ``imagenet``, the name of an enabled training stage (its export), or ``<label>=<path>``."""
    grid: list[str] = field(default_factory=list)
    """``key=value`` for compare.py itself (``label_fractions=[...]``, ``seeds=[...]``, ``regimes=[...]``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for every fine-tune run, after ``common`` (``optim.epochs=10`` ...)."""


@dataclass
class AuditSpec:
    enabled: bool = True
    config: str = "configs/audit.yaml"
    generators: list[str] = field(default_factory=lambda: ["dcgan", "vae"])
    """Training stages whose samples are audited (those enabled)."""
    features: str = "simclr"
    """Backbone of the discriminator and feature metrics: a training stage, ``imagenet`` or ``scratch``."""
    n_samples: int = 1000
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for scripts/audit_synthetic.py (``data.*`` keys of ``common`` are passed too)."""


@dataclass
class LaunchSpec:
    launcher: Literal["accelerate", "torchrun", "python"] = "accelerate"
    config_file: str = "configs/accelerate/single.yaml"
    """``accelerate`` only: one of ``configs/accelerate/`` (single, multi_gpu, fsdp, multi_node) or your own."""
    args: list[str] = field(default_factory=list)
    """Extra launcher arguments (``[--machine_rank, 1]``; torchrun: ``[--nproc_per_node, 2]``)."""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    title: str = ""
    description: str = ""
    """One paragraph for the report: the question and the budget."""
    out_dir: str = "runs/experiments"
    """Results go to ``<out_dir>/<name>/``."""
    common: list[str] = field(default_factory=list)
    """``key=value`` given to every training stage and fine-tune run (``data.dataset=...``, ``backbone.arch=...``)."""
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    simclr: StageSpec = field(default_factory=StageSpec)
    moco: StageSpec = field(default_factory=StageSpec)
    vae: StageSpec = field(default_factory=StageSpec)
    dcgan: StageSpec = field(default_factory=StageSpec)
    classification: GridSpec = field(default_factory=GridSpec)
    segmentation: GridSpec = field(default_factory=lambda: GridSpec(config="configs/compare_drive.yaml"))
    audit: AuditSpec = field(default_factory=AuditSpec)
    dry_run: bool = False
    """Print what would run, resume or be reused; run nothing."""


# --------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------


def stage_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resolved(config_file: str, overrides: list[str]) -> dict[str, Any]:
    """A stage config as a nested mapping: its YAML file with the overrides applied (no schema)."""
    base = read_yaml(ROOT / config_file) if config_file else {}
    files, over = parse_args(overrides)
    for f in files:
        base = _merge(base, read_yaml(ROOT / f))
    return _merge(base, over)


def data_of(conf: dict[str, Any]) -> DataConfig:
    keys = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in (conf.get("data") or {}).items() if k in keys})


def launcher_cmd(launch: LaunchSpec, script: str) -> list[str]:
    py = sys.executable
    if launch.launcher == "python":
        return [py, str(ROOT / script)]
    if launch.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", *launch.args, str(ROOT / script)]
    cfg_args = ["--config_file", str(ROOT / launch.config_file)] if launch.config_file else []
    return [py, "-m", "accelerate.commands.launch", *cfg_args, *launch.args, str(ROOT / script)]


def run_logged(cmd: list[str], log: Path) -> int:
    """Run ``cmd``; its output goes to the console and to ``log`` (appended: a resumed stage keeps both)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
            fh.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return proc.wait()


class StageFailed(RuntimeError):
    pass


@dataclass
class Stage:
    """One stage's record in ``experiment.json`` (``status``: run, resumed, reused, failed, planned)."""

    name: str
    hash: str
    output: str
    status: str = "planned"
    wall_s: float = 0.0
    log: str = ""
    detail: str = ""


def record(exp_dir: Path, stage: Stage) -> None:
    path = exp_dir / "stages" / f"{stage.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(stage), indent=2) + "\n")


def previous_wall(exp_dir: Path, name: str, h: str) -> float:
    """Wall-clock the stage took when it was computed (kept across reuses)."""
    try:
        old = json.loads((exp_dir / "stages" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return 0.0
    return float(old.get("wall_s", 0.0)) if old.get("hash") == h else 0.0


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def train_stage(cfg: ExperimentConfig, exp_dir: Path, name: str) -> Stage:
    """Pretraining / generative stage: reuse its export, resume it, or run it."""
    spec: StageSpec = getattr(cfg, name)
    script = TRAIN_STAGES[name]
    config_file = spec.config or f"configs/{name}.yaml"
    overrides = [*cfg.common, *spec.overrides]
    conf = resolved(config_file, overrides)
    h = stage_hash(script, conf, data_stamp(data_of(conf)))
    run_dir = exp_dir / name / h
    stage = Stage(name, h, str(run_dir / "backbone.safetensors"), log=str(exp_dir / "logs" / f"{name}.log"))
    if (run_dir / "backbone.safetensors").is_file():
        stage.status, stage.wall_s = "reused", previous_wall(exp_dir, name, h)
        return stage
    resuming = bool(list_checkpoints(run_dir / "checkpoints"))
    stage.status = "resumed" if resuming else "run"
    if cfg.dry_run:
        stage.detail = "would " + ("resume" if resuming else "run")
        return stage
    if run_dir.exists() and not resuming:  # died before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    argv = ["--config", str(ROOT / config_file), *overrides, f"out_dir={run_dir.parent}", f"run_name={h}",
            "train.resume=auto"]
    t0 = time.perf_counter()
    code = run_logged([*launcher_cmd(cfg.launch, script), *argv], Path(stage.log))
    stage.wall_s = previous_wall(exp_dir, name, h) + time.perf_counter() - t0  # a resume adds to the first part
    if code != 0 or not (run_dir / "backbone.safetensors").is_file():
        stage.status, stage.detail = "failed", f"exit code {code}; log {stage.log}"
        record(exp_dir, stage)
        raise StageFailed(f"stage {name} failed (exit code {code}); see {stage.log}. Run the same command "
                          "again to resume it from its last checkpoint.")
    return stage


def script_stage(cfg: ExperimentConfig, exp_dir: Path, stage: Stage, product: Path, cmd: list[str]) -> Stage:
    """A one-process stage: reused when ``product`` exists, else ``cmd`` runs (``StageFailed`` if it fails
    or leaves no ``product``)."""
    if product.is_file():
        stage.status, stage.wall_s = "reused", previous_wall(exp_dir, stage.name, stage.hash)
        return stage
    if cfg.dry_run:
        stage.detail = "would run"
        return stage
    t0 = time.perf_counter()
    code = run_logged(cmd, Path(stage.log))
    stage.status, stage.wall_s = "run", time.perf_counter() - t0
    if code != 0 or not product.is_file():
        stage.status, stage.detail = "failed", f"exit code {code}; log {stage.log}"
        record(exp_dir, stage)
        raise StageFailed(f"stage {stage.name} failed (exit code {code}); see {stage.log}")
    return stage


def sample_and_audit(cfg: ExperimentConfig, exp_dir: Path, gen: str, gen_stage: Stage,
                     feat: str) -> list[Stage]:
    """Draw ``n_samples`` from generator stage ``gen`` and audit them with backbone ``feat``."""
    a = cfg.audit
    model = Path(gen_stage.output).parent / GENERATOR_FILES[gen]
    sh = stage_hash(gen_stage.hash, a.n_samples, a.seed)
    sdir = exp_dir / "samples" / f"{gen}-{sh}"
    samples = script_stage(
        cfg, exp_dir, Stage(f"samples_{gen}", sh, str(sdir / "samples.npz"), log=str(exp_dir / "logs" / f"samples_{gen}.log")),
        sdir / "samples.npz",
        [sys.executable, str(ROOT / "generative" / "sample.py"), f"model={model}", f"n={a.n_samples}",
         f"seed={a.seed}", f"out={sdir}"])
    overrides = [*(o for o in cfg.common if o.startswith("data.")), *a.overrides]
    conf = resolved(a.config, overrides)
    ah = stage_hash("audit", conf, sh, feat, data_stamp(data_of(conf)))
    adir = exp_dir / "audit" / f"{gen}-{ah}"
    audit = script_stage(
        cfg, exp_dir, Stage(f"audit_{gen}", ah, str(adir / "audit.md"), log=str(exp_dir / "logs" / f"audit_{gen}.log")),
        adir / "audit.json",
        [sys.executable, str(ROOT / "scripts" / "audit_synthetic.py"), "--config", str(ROOT / a.config), *overrides,
         f"fake={sdir / 'samples.npz'}", f"backbone={feat}", f"out={adir}"])
    return [samples, audit]


def grid_stage(cfg: ExperimentConfig, exp_dir: Path, task: str, exports: dict[str, Stage]) -> tuple[Stage, list]:
    """The fine-tune grid of ``task`` through scripts/compare.py (cells reused by their own hash)."""
    spec: GridSpec = getattr(cfg, task)
    inits = []
    for init in spec.inits:
        if init in TRAIN_STAGES:
            if init not in exports:
                raise ConfigError(f"{task}.inits has {init!r} but stage {init} is not enabled; enable it or "
                                  f"give {init}=<path to backbone.safetensors>")
            inits.append(f"{init}={exports[init].output}")
        else:
            inits.append(init)
    launch = (["launcher=inprocess"] if cfg.launch.launcher == "python" else
              [f"launcher={cfg.launch.launcher}",
               "launch_args=" + json.dumps(
                   (["--config_file", str(ROOT / cfg.launch.config_file)]
                    if cfg.launch.launcher == "accelerate" and cfg.launch.config_file else []) + cfg.launch.args)])
    base = load_config(compare.CompareConfig, ["--config", str(ROOT / spec.config)])
    argv = ["--config", str(ROOT / spec.config), *launch, *spec.grid, "inits=" + json.dumps(inits),
            "overrides=" + json.dumps([*base.overrides, *cfg.common, *spec.overrides, "resume=auto"]),
            f"runs_dir={exp_dir}", f"name={task}"]  # a launcher in spec.grid wins over the experiment's
    ccfg = load_config(compare.CompareConfig, argv)
    if not ccfg.title or ccfg.title == base.title:
        ccfg = dataclasses.replace(ccfg, title=f"{cfg.title or cfg.name}: {task}")
    h = stage_hash(config_to_dict(ccfg))
    stage = Stage(task, h, str(exp_dir / "reports" / task / "report.md"), log=str(exp_dir / "logs" / f"{task}.log"))
    todo = compare.pending(ccfg, ("complete", "unavailable"))  # unavailable arms are retried, but cost nothing
    if cfg.dry_run:
        stage.detail = f"{len(todo)} of {len(compare.grid(ccfg))} runs to do"
        return stage, []
    t0 = time.perf_counter()
    _, results = compare.run(ccfg)
    spent = time.perf_counter() - t0
    stage.status = "reused" if not todo else "run"
    stage.wall_s = spent if todo else previous_wall(exp_dir, task, h)
    stage.detail = (f"{sum(r.get('status') == 'complete' for r in results)} complete, "
                    f"{sum(r.get('status') == 'unavailable' for r in results)} unavailable, "
                    f"{sum(r.get('status') == 'failed' for r in results)} failed of {len(results)} runs; "
                    f"{len(todo)} computed now")
    return stage, results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
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


def write_report(cfg: ExperimentConfig, exp_dir: Path, stages: list[Stage], grids: dict[str, list],
                 started: float) -> Path:
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
    for task, results in grids.items():
        if not results:
            continue
        rows = recommend(results)
        md += [f"## Which initialisation? ({task})", ""]
        md += recommendation_markdown(rows, seg=task == "segmentation")
        metric = "dice" if task == "segmentation" else "auc"
        md += ["", f"Test {metric.upper() if metric == 'auc' else 'Dice'} by init, regime and label budget "
               "(mean ± sd over seeds, n = seeds):", ""]
        md += efficiency_markdown(summarize(results, headline=metric), metric, seg=task == "segmentation")
        md += ["", f"Full comparison, label-efficiency curves and plots: [reports/{task}/report.md]"
                   f"(reports/{task}/report.md).", "",
               f"![label efficiency](reports/{task}/label_efficiency.png)", ""]
    audits = [s for s in stages if s.name.startswith("audit_") and Path(s.output).with_name("audit.json").is_file()]
    if audits:
        md += ["## Synthetic images (audit)", "",
               "Cross-fitted real-vs-fake discriminator AUC [95% CI] (0.5 = indistinguishable); distribution metrics "
               "in the feature space of the audit backbone, fake vs real with the real-vs-real baseline in brackets.",
               "", "| generator | real-vs-fake AUC | FID | KID | precision | recall | memorised | report |", "|---|---|---|---|---|---|---|---|"]
        for s in audits:
            a = json.loads(Path(s.output).with_name("audit.json").read_text())
            md.append("| " + " | ".join([s.name.removeprefix("audit_"), *_audit_cells(a),
                                         f"[audit.md]({Path(s.output).relative_to(exp_dir)})"]) + " |")
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
               "recommendations": {t: recommend(r) for t, r in grids.items() if r},
               "summary": {t: {"metric": "dice" if t == "segmentation" else "auc",
                               "rows": summarize(r, headline="dice" if t == "segmentation" else "auc")}
                           for t, r in grids.items() if r}}
    atomic_write_text(exp_dir / "experiment.json", json.dumps(summary, indent=2, default=str) + "\n")
    return path


def _audit_cells(a: dict[str, Any]) -> list[str]:
    """Realism AUC, FID / KID / precision / recall (fake, and the real-vs-real baseline), memorised count."""
    disc, fk, rb, memo = a["discriminator"], a["distribution"]["fake"], a["distribution"]["real_baseline"], \
        a["memorisation"]
    lo, hi = disc["auc_ci95"]
    return [f"{disc['auc']:.3f} [{lo:.3f}, {hi:.3f}]", f"{fk['fid']:.2f} ({rb['fid']:.2f})",
            f"{fk['kid']:.4f} ({rb['kid']:.4f})", f"{fk['precision']:.3f} ({rb['precision']:.3f})",
            f"{fk['recall']:.3f} ({rb['recall']:.3f})", f"{memo['n_flagged']} / {a['fake']['n_used']}"]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("run_experiment.py orchestrates and launches every stage itself: start it with python "
                         "(or `accelerate launch --num_processes 1`) and choose the processes with "
                         "launch.config_file=configs/accelerate/<...>.yaml or launch.launcher=torchrun")
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        argv = ["--config", argv[0], *argv[1:]]  # the experiment file as the first argument
    cfg = load_config(ExperimentConfig, argv)
    exp_dir = (ROOT / cfg.out_dir / cfg.name).resolve()
    started = time.time()
    print(f"[experiment] {cfg.name}: {exp_dir}" + (" (dry run)" if cfg.dry_run else ""))
    if not cfg.dry_run:
        exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir, name="experiment.yaml")

    stages: list[Stage] = []
    exports: dict[str, Stage] = {}

    def done(stage: Stage) -> None:
        stages.append(stage)
        print(f"[experiment] {stage.name}: {stage.status}{' - ' + stage.detail if stage.detail else ''} "
              f"({stage.wall_s:.0f} s) -> {stage.output}")
        if not cfg.dry_run:
            record(exp_dir, stage)

    for name in TRAIN_STAGES:
        if getattr(cfg, name).enabled:
            print(f"[experiment] {name} ...")
            exports[name] = train_stage(cfg, exp_dir, name)
            done(exports[name])

    if cfg.audit.enabled:
        feat = cfg.audit.features
        if feat in TRAIN_STAGES:
            if feat not in exports:
                raise ConfigError(f"audit.features={feat!r} but stage {feat} is not enabled")
            feat = exports[feat].output
        for gen in cfg.audit.generators:
            if gen not in GENERATOR_FILES:
                raise ConfigError(f"audit.generators: {gen!r} is not a generator stage ({list(GENERATOR_FILES)})")
            if gen in exports:
                print(f"[experiment] samples + audit of {gen} ...")
                for s in sample_and_audit(cfg, exp_dir, gen, exports[gen], feat):
                    done(s)

    grids: dict[str, list] = {}
    for task in ("classification", "segmentation"):
        if getattr(cfg, task).enabled:
            print(f"[experiment] {task} grid ...")
            stage, grids[task] = grid_stage(cfg, exp_dir, task, exports)
            done(stage)

    if cfg.dry_run:
        return exp_dir
    report = write_report(cfg, exp_dir, stages, grids, started)
    print(f"[experiment] report: {report} ({(time.time() - started) / 60:.1f} min)")
    return report


if __name__ == "__main__":
    try:
        main()
    except (StageFailed, ConfigError) as e:
        raise SystemExit(f"[experiment] ERROR: {e}") from None
