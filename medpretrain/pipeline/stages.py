"""The stages of an experiment: how each is hashed, reused, resumed or run, and its record.

A training stage's folder is named by a hash of its script, its resolved config and the data files
(:func:`medpretrain.data.data_stamp`). The config is resolved the way the stage script will resolve it
(its YAML file, the experiment's ``common`` and the stage's ``overrides``) and, when the stage registers
its config dataclass (:attr:`medpretrain.methods.registry.StageInfo.schema`), validated against it first:
an unknown key or a wrong type fails before anything runs, and the hash is taken over the full resolved
config (defaults included), not over strings. A stage whose product exists under that hash is reused, one
with checkpoints but no product is resumed (``train.resume=auto``), one that died before its first
checkpoint starts again. The product is ``backbone.safetensors``, or for a generator-only stage (the DDPM)
its generator file (:attr:`~medpretrain.methods.registry.StageInfo.done_file`); such a stage is sampled and
audited but is no fine-tuning arm (:func:`check_backbone_refs`). A fine-tune override
``data.synthetic=stage:<generator>[:<n>]`` is resolved to that generator's per-class samples, drawn before the
grid's cells (:func:`resolve_synthetic`, :func:`synthetic_stage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpretrain.cli import UserError
from medpretrain.config import (
    ConfigError,
    DataConfig,
    hash_view,
    merge_overrides,
    read_yaml,
    resolve_config,
)
from medpretrain.data import data_stamp
from medpretrain.methods import registry
from medpretrain.pipeline.console import Console, relay
from medpretrain.pipeline.grid import CompareConfig, cell_config, grid, pending, previous, run_grid
from medpretrain.pipeline.schema import GRID_TASKS
from medpretrain.results import STATUSES, RunResult
from medpretrain.resume import list_checkpoints
from medpretrain.utils import PROJECT_ROOT, atomic_write_text

if TYPE_CHECKING:
    from medpretrain.pipeline.schema import ExperimentConfig, GridSpec, LaunchSpec, VariantSpec

ROOT = PROJECT_ROOT
AUDIT_SCRIPT = "scripts/audit_synthetic.py"
SAMPLE_SCRIPT = "generative/sample.py"


class StageFailed(UserError):
    """A stage exited non-zero or left no product; the message names its log (run again to resume)."""


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


def stage_hash(*parts: Any) -> str:
    """12 hex digits of the SHA-256 of ``parts`` as sorted JSON."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def schema_of(info: registry.StageInfo) -> type | None:
    """The stage's config dataclass (``StageInfo.schema``, ``"module:Class"``), or ``None`` when it names none."""
    if not info.schema:
        return None
    module, _, name = info.schema.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"stage {info.name}: its schema {info.schema!r} cannot be imported ({e})") from None


def stage_config(info: registry.StageInfo, config_file: str, overrides: list[str]) -> dict[str, Any]:
    """A stage's config as the stage script will resolve it from ``--config <config_file> <overrides>``:
    validated against its schema and complete (defaults included, :func:`hash_view`) when the stage names one, else the YAML
    file with the overrides merged in. Raises :class:`ConfigError` for an unknown key or a wrong type."""
    schema = schema_of(info)
    if schema is not None:
        try:
            return hash_view(resolve_config(schema, config_file or None, overrides, root=ROOT))
        except ConfigError as e:
            raise ConfigError(f"stage {info.name}: {e}") from None
    return merge_overrides(read_yaml(ROOT / config_file) if config_file else {}, overrides, root=ROOT)


def top_key(override: str) -> str | None:
    """The top-level key of a ``key=value`` / ``--key=value`` override (``optim`` of ``optim.steps=300``)."""
    return override.partition("=")[0].strip().lstrip("-").split(".")[0] if "=" in override else None


def schema_keys(schema: type) -> set[str]:
    """The top-level keys a config schema takes: its fields and aliases."""
    return {f.name for f in dataclasses.fields(schema)} | set(getattr(schema, "ALIASES", {}))


def taken_by(schema: type | None, overrides: list[str]) -> list[str]:
    """The overrides whose top-level key ``schema`` has (all of them when there is no schema)."""
    if schema is None:
        return list(overrides)
    keys = schema_keys(schema)
    return [o for o in overrides if top_key(o) is None or top_key(o) in keys]


def stage_common(info: registry.StageInfo, common: list[str]) -> list[str]:
    """The experiment's ``common`` (or a variant's) overrides that stage ``info`` takes: those whose top-level
    key its schema has (a field or an alias), so ``backbone.arch=...`` reaches the backbone stages and skips
    the DDPM, whose config has no ``backbone``, and a variant's ``optim.steps=300`` reaches its fine-tune cells,
    not its pretraining; all of them when the stage names no schema. A misspelt key inside a group the stage
    has still fails (and a top-level key nothing takes: :func:`medpretrain.pipeline.experiment.check_variants`)."""
    return taken_by(schema_of(info), common)


def data_of(conf: dict[str, Any]) -> DataConfig:
    """The ``data`` group of a resolved stage config (keys DataConfig does not know are ignored)."""
    keys = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in (conf.get("data") or {}).items() if k in keys})


def launcher_cmd(launch: LaunchSpec, script: str) -> list[str]:
    """The command prefix that starts ``script`` with the experiment's launcher."""
    py = sys.executable
    if launch.launcher == "python":
        return [py, str(ROOT / script)]
    # medpretrain.launch runs accelerate's / torchrun's own launcher and exits with the child's status, so a
    # stage's expected error stays one line in its log (no launcher traceback after it).
    if launch.launcher == "torchrun":
        return [py, "-m", "medpretrain.launch", "--torchrun", *launch.args, str(ROOT / script)]
    cfg_args = ["--config_file", str(ROOT / launch.config_file)] if launch.config_file else []
    return [py, "-m", "medpretrain.launch", *cfg_args, *launch.args, str(ROOT / script)]


def run_logged(cmd: list[str], log: Path, console: Console = None) -> int:
    """Run ``cmd`` in the project root; its output goes to ``console`` and to ``log`` (appended: a resumed
    stage keeps both parts). Returns the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr, attr-defined]
            fh.write(chunk)
            relay(console, chunk)
        return proc.wait()


def record(exp_dir: Path, stage: Stage) -> None:
    """Write ``<exp_dir>/stages/<name>.json``."""
    path = exp_dir / "stages" / f"{stage.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dataclasses.asdict(stage), indent=2) + "\n")


def previous_wall(exp_dir: Path, name: str, h: str) -> float:
    """Wall-clock the stage took when it was computed (kept across reuses): from its own record, else from any
    record of the same hash (a stage that became replicate ``<name>_seed0`` of a section given ``seeds`` has the
    hash it had as ``<name>``); 0 when none is found."""
    records = [exp_dir / "stages" / f"{name}.json", *sorted((exp_dir / "stages").glob("*.json"))]
    for path in records:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if old.get("hash") == h and float(old.get("wall_s", 0.0)) > 0:
            return float(old["wall_s"])
    return 0.0


def variant_label(name: str, variant: VariantSpec | None) -> str:
    """``name`` of an arm or stage, ``<name>@<variant>`` in a variant."""
    return f"{name}@{variant.name}" if variant is not None else name


def train_stage(cfg: ExperimentConfig, exp_dir: Path, name: str, console: Console = None,
                seed: int | None = None, variant: VariantSpec | None = None) -> Stage:
    """Pretraining / generative stage ``name`` (a registered stage): reuse its export, resume it, or run it;
    ``seed``: one replicate (``train.seed=<seed>``, recorded as ``<name>_seed<seed>``); ``variant``: with the
    variant's overrides last (recorded as ``<name>@<variant>``). Raises :class:`StageFailed` when it fails."""
    info = registry.stage(name)
    spec = getattr(cfg, name)
    config_file = spec.config or info.config
    overrides = [*stage_common(info, cfg.common), *spec.overrides,
                 *(stage_common(info, variant.overrides) if variant else []),
                 *([f"train.seed={seed}"] if seed is not None else [])]
    conf = stage_config(info, config_file, overrides)
    h = stage_hash(info.script, conf, data_stamp(data_of(conf)))
    run_dir = exp_dir / name / h
    label = variant_label(name if seed is None else f"{name}_seed{seed}", variant)
    product = run_dir / info.done_file  # backbone.safetensors; a generator-only stage's generator file
    stage = Stage(label, h, str(product), log=str(exp_dir / "logs" / f"{label}.log"))
    if product.is_file():
        stage.status, stage.wall_s = "reused", previous_wall(exp_dir, label, h)
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
    code = run_logged([*launcher_cmd(cfg.launch, info.script), *argv], Path(stage.log), console)
    stage.wall_s = previous_wall(exp_dir, label, h) + time.perf_counter() - t0  # a resume adds to the first part
    if code != 0 or not product.is_file():
        stage.status, stage.detail = "failed", f"exit code {code}; log {stage.log}"
        record(exp_dir, stage)
        raise StageFailed(f"stage {label} failed (exit code {code}); see {stage.log}. Run the same command "
                          "again to resume it from its last checkpoint.")
    return stage


def script_stage(cfg: ExperimentConfig, exp_dir: Path, stage: Stage, product: Path, cmd: list[str],
                 console: Console = None) -> Stage:
    """A one-process stage: reused when ``product`` exists, else ``cmd`` runs (``StageFailed`` if it fails
    or leaves no ``product``)."""
    if product.is_file():
        stage.status, stage.wall_s = "reused", previous_wall(exp_dir, stage.name, stage.hash)
        return stage
    if cfg.dry_run:
        stage.detail = "would run"
        return stage
    t0 = time.perf_counter()
    code = run_logged(cmd, Path(stage.log), console)
    stage.status, stage.wall_s = "run", time.perf_counter() - t0
    if code != 0 or not product.is_file():
        stage.status, stage.detail = "failed", f"exit code {code}; log {stage.log}"
        record(exp_dir, stage)
        raise StageFailed(f"stage {stage.name} failed (exit code {code}); see {stage.log}")
    return stage


def sample_and_audit(cfg: ExperimentConfig, exp_dir: Path, gen: str, gen_stage: Stage, feat: str,
                     console: Console = None) -> list[Stage]:
    """Draw ``audit.n_samples`` from generator stage ``gen`` (a conditional one in the class mix ``audit.mix``)
    and audit them with backbone ``feat``."""
    a = cfg.audit
    model = Path(gen_stage.output).parent / registry.generators()[gen]
    sh = stage_hash(gen_stage.hash, a.n_samples, a.seed, *([a.mix] if a.mix != "even" else []))
    sdir = exp_dir / "samples" / f"{gen}-{sh}"
    samples = script_stage(
        cfg, exp_dir, Stage(f"samples_{gen}", sh, str(sdir / "samples.npz"), log=str(exp_dir / "logs" / f"samples_{gen}.log")),
        sdir / "samples.npz",
        [sys.executable, str(ROOT / SAMPLE_SCRIPT), f"model={model}", f"n={a.n_samples}", f"mix={a.mix}",
         f"seed={a.seed}", f"out={sdir}"], console)
    overrides = [*(o for o in cfg.common if o.startswith("data.")), *a.overrides]
    conf = merge_overrides(read_yaml(ROOT / a.config) if a.config else {}, overrides, root=ROOT)
    ah = stage_hash("audit", conf, sh, feat, data_stamp(data_of(conf)))
    adir = exp_dir / "audit" / f"{gen}-{ah}"
    audit = script_stage(
        cfg, exp_dir, Stage(f"audit_{gen}", ah, str(adir / "audit.md"), log=str(exp_dir / "logs" / f"audit_{gen}.log")),
        adir / "audit.json",
        [sys.executable, str(ROOT / AUDIT_SCRIPT), "--config", str(ROOT / a.config), *overrides,
         f"fake={sdir / 'samples.npz'}", f"backbone={feat}", f"out={adir}"], console)
    return [samples, audit]


# ------------------------------------------------------------------------------------------------
# data.synthetic=stage:<generator>[:<n>]: per-class samples of a generator stage for the fine-tune cells
# ------------------------------------------------------------------------------------------------

SYNTHETIC_KEY = "data.synthetic"
SYNTHETIC_PREFIX = "stage:"
SYNTHETIC_PER_CLASS = 1000
"""Samples per class drawn for ``data.synthetic=stage:<generator>`` without a count."""
SYNTHETIC_SEED = 0
"""Seed of the per-class sample file (each cell draws its own subset of it by the cell's seed)."""


@dataclass(frozen=True)
class SyntheticSource:
    """A ``data.synthetic=stage:<label>[:<n>]`` override resolved: ``per_class`` samples of every class drawn from
    generator stage ``label`` (``<stage>`` or ``<stage>@<variant>``; its first replicate) into ``npz``, a folder
    named by ``hash`` (the generator stage's hash, ``per_class`` and :data:`SYNTHETIC_SEED`)."""

    label: str
    per_class: int
    model: Path
    hash: str
    npz: Path


def synthetic_override(overrides: list[str]) -> tuple[int, int, str] | None:
    """The effective (last) ``data.synthetic`` override of ``overrides`` (``key=value``, ``--key=value`` or
    ``--key value``) as ``(first token, value token, value)``, or ``None``."""
    found = None
    for i, tok in enumerate(overrides):
        key, eq, value = tok.partition("=")
        key = key.strip().lstrip("-").replace("-", "_") if tok.startswith("--") or eq else ""
        if key != SYNTHETIC_KEY:
            continue
        if eq:
            found = (i, i, value.strip())
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            found = (i, i + 1, overrides[i + 1].strip())
    return found


def parse_synthetic_ref(value: str) -> tuple[str, int] | None:
    """``stage:<label>[:<n per class>]`` -> ``(label, n)`` (``n`` default :data:`SYNTHETIC_PER_CLASS`); any other
    value (a file path, empty) -> ``None``. Raises :class:`ConfigError` for a bad count."""
    if not value.startswith(SYNTHETIC_PREFIX):
        return None
    label, _, n = value.removeprefix(SYNTHETIC_PREFIX).partition(":")
    if not label or (n and (not n.isdigit() or int(n) < 1)):
        raise ConfigError(f"{SYNTHETIC_KEY}={value!r}: expected stage:<generator stage>[:<samples per class >= 1>]")
    return label.strip(), int(n) if n else SYNTHETIC_PER_CLASS


def check_synthetic_label(label: str, where: str, enabled: dict[str, bool], variant_stages: dict[str, list[str]]) -> None:
    """Raise :class:`ConfigError` unless ``label`` (``<stage>[@<variant>]``) names an enabled generator stage."""
    gen, _, var = label.partition("@")
    generators = registry.generators()
    if gen not in generators:
        raise ConfigError(f"{where}: {SYNTHETIC_KEY}=stage:{label}: {gen!r} is not a generator stage "
                          f"({', '.join(generators)})")
    if not enabled.get(gen, False):
        raise ConfigError(f"{where}: {SYNTHETIC_KEY}=stage:{label}: stage {gen} is not enabled")
    if var and gen not in variant_stages.get(var, []):
        raise ConfigError(f"{where}: {SYNTHETIC_KEY}=stage:{label}: variants[{var}].stages has no {gen}")


def _synthetic_keys(overrides: list[str]) -> list[str]:
    """The ``data.synthetic*`` keys set in ``overrides``."""
    keys = [tok.partition("=")[0].strip().lstrip("-").replace("-", "_") for tok in overrides
            if "=" in tok or tok.startswith("--")]
    return [k for k in keys if k.startswith(SYNTHETIC_KEY)]


def check_synthetic_refs(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` (one line) for ``data.synthetic*`` where training stages would get it too
    (``common``, a variant with ``stages``) or a ``data.synthetic=stage:<label>`` that names no enabled generator
    stage. Called before any stage runs."""
    if _synthetic_keys(list(cfg.common)):
        raise ConfigError(f"common has {', '.join(_synthetic_keys(list(cfg.common)))}: synthetic images belong to "
                          "fine-tuning; put it in a grid's or a variant's overrides")
    for v in cfg.variants:
        if v.stages and _synthetic_keys(list(v.overrides)):
            raise ConfigError(f"variants[{v.name}] sets {', '.join(_synthetic_keys(list(v.overrides)))} and has "
                              f"stages {v.stages}, which would get it too: give the synthetic arm its own variant "
                              "without stages")
    enabled = {n: getattr(cfg, n).enabled for n in registry.all_stages()}
    variant_stages = {v.name: list(v.stages) for v in cfg.variants}
    lists = [(f"{task}.overrides", getattr(cfg, task).overrides) for task in GRID_TASKS]
    lists += [(f"variants[{v.name}].overrides", v.overrides) for v in cfg.variants]
    for where, overrides in lists:
        found = synthetic_override(list(overrides))
        ref = parse_synthetic_ref(found[2]) if found else None
        if ref is not None:
            check_synthetic_label(ref[0], where, enabled, variant_stages)


def resolve_synthetic(overrides: list[str], exp_dir: Path,
                      exports: dict[str, list[Stage]]) -> tuple[list[str], SyntheticSource | None]:
    """``overrides`` with an effective ``data.synthetic=stage:<label>[:<n>]`` replaced by the path of that
    generator's per-class sample file (``<exp_dir>/samples/<label>-per-class-<hash>/samples.npz``), and what it
    names; unchanged and ``None`` without one. Raises :class:`ConfigError` when ``label`` is no trained generator
    stage of this experiment."""
    found = synthetic_override(overrides)
    ref = parse_synthetic_ref(found[2]) if found else None
    if found is None or ref is None:
        return list(overrides), None
    label, n = ref
    gen = label.partition("@")[0]
    if gen not in registry.generators() or label not in exports or not exports[label]:
        trained = [k for k in exports if k.partition("@")[0] in registry.generators()]
        raise ConfigError(f"{SYNTHETIC_KEY}=stage:{label}: no generator stage {label!r} in this experiment "
                          f"(trained generators: {', '.join(trained) or 'none'})")
    gen_stage = exports[label][0]  # the first replicate, as the audit
    sh = stage_hash(gen_stage.hash, "per_class", n, SYNTHETIC_SEED)
    src = SyntheticSource(label, n, Path(gen_stage.output).parent / registry.generators()[gen], sh,
                          exp_dir / "samples" / f"{label}-per-class-{sh}" / "samples.npz")
    first, last, _ = found
    out = [*overrides[:first], f"{SYNTHETIC_KEY}={src.npz}", *overrides[last + 1:]]
    return out, src


def synthetic_stage(cfg: ExperimentConfig, exp_dir: Path, src: SyntheticSource, console: Console = None) -> Stage:
    """Draw ``src.per_class`` samples of every class from ``src``'s generator (``generative/sample.py
    per_class=<n>``) into ``src.npz``; reused when it exists."""
    name = f"samples_{src.label}_per_class"
    return script_stage(
        cfg, exp_dir, Stage(name, src.hash, str(src.npz), log=str(exp_dir / "logs" / f"{name}.log")), src.npz,
        [sys.executable, str(ROOT / SAMPLE_SCRIPT), f"model={src.model}", f"per_class={src.per_class}",
         f"seed={SYNTHETIC_SEED}", f"out={src.npz.parent}", "png=false"], console)


def check_backbone_refs(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` (one line) when an enabled grid or a variant names a generator-only stage as
    an init, or the audit as its feature backbone: it has no backbone to transfer. Called before any stage runs."""
    trained = registry.all_stages()
    named = [(f"{task}.inits", init) for task in GRID_TASKS if getattr(cfg, task).enabled
             for init in getattr(cfg, task).inits]
    named += [(f"variants[{v.name}].inits", init) for v in cfg.variants for init in v.inits]
    if cfg.audit.enabled:
        named.append(("audit.features", cfg.audit.features))
    for where, init in named:
        if init in trained and not trained[init].exports_backbone:
            raise ConfigError(f"{where} has {init!r}, but stage {init} exports no backbone to transfer (it only "
                              f"generates images: list it under audit.generators)")
    check_synthetic_refs(cfg)


def grid_config(cfg: ExperimentConfig, exp_dir: Path, task: str, exports: dict[str, list[Stage]],
                variant: VariantSpec | None = None) -> CompareConfig:
    """The fine-tune grid of ``task`` as a validated :class:`CompareConfig`: the grid file, the experiment's
    launcher (a launcher in ``grid`` wins), ``grid``, then the inits (training stages become their exports)
    and every run's overrides (the grid file's, ``common``, the task's, ``resume=auto``). ``variant``: the
    variant's arms (``<init>@<variant>``, exports keyed so in ``exports``) with its overrides last, reported as
    ``<task>@<variant>``."""
    spec: GridSpec = getattr(cfg, task)
    check_backbone_refs(cfg)
    trained, backbones = registry.all_stages(), registry.stages()  # only the second have a backbone to transfer
    names = (variant.inits or ["scratch", "imagenet", *(s for s in variant.stages if s in backbones)]) if variant \
        else (spec.inits or ["scratch", "imagenet", *(e for e in exports if e in backbones)])
    inits = []
    for init in names:
        label = variant_label(init, variant)
        if init in trained:
            if label not in exports:
                where = f"variants[{variant.name}].stages" if variant else "it"
                raise ConfigError(f"{task}.inits has {label!r} but stage {init} is not enabled in {where}; enable "
                                  f"it or give {init}=<path to backbone.safetensors>")
            inits.append(f"{label}=" + "|".join(st.output for st in exports[label]))  # replicates: see grid()
        elif variant is not None and "=" not in init:
            inits.append(f"{label}={init}")  # scratch / imagenet under the variant's name
        else:
            inits.append(init)
    launch = (["launcher=inprocess"] if cfg.launch.launcher == "python" else
              [f"launcher={cfg.launch.launcher}",
               "launch_args=" + json.dumps(
                   (["--config_file", str(ROOT / cfg.launch.config_file)]
                    if cfg.launch.launcher == "accelerate" and cfg.launch.config_file else []) + cfg.launch.args)])
    base = resolve_config(CompareConfig, spec.config, root=ROOT)
    overrides, _ = resolve_synthetic(cell_overrides(cfg, task, variant), exp_dir, exports)  # stage:<generator>
    ccfg = resolve_config(CompareConfig, spec.config, [*launch, *spec.grid, *(variant.grid if variant else [])],
                          root=ROOT, values={
        "inits": inits, "overrides": overrides, "runs_dir": str(exp_dir), "name": variant_label(task, variant)})
    if not ccfg.title or ccfg.title == base.title:
        ccfg = dataclasses.replace(ccfg, title=f"{cfg.title or cfg.name}: {variant_label(task, variant)}")
    if variant is not None:
        ccfg = dataclasses.replace(ccfg, notes=[*ccfg.notes, variant_note(variant)])
    return ccfg


def cell_overrides(cfg: ExperimentConfig, task: str, variant: VariantSpec | None = None) -> list[str]:
    """Every fine-tune cell's overrides in ``task``'s grid, before :func:`resolve_synthetic`: the grid file's,
    ``common``, the task's, the variant's that fine-tuning takes (not a pretraining-only ``train.epochs=15``),
    ``resume=auto``."""
    base = resolve_config(CompareConfig, getattr(cfg, task).config, root=ROOT)
    from medpretrain.finetune import FinetuneConfig

    return [*base.overrides, *cfg.common, *getattr(cfg, task).overrides,
            *(taken_by(FinetuneConfig, variant.overrides) if variant else []), "resume=auto"]


def variant_note(variant: VariantSpec) -> str:
    """The report's line saying what the ``@<variant>`` arms changed."""
    return f"Arms `…@{variant.name}`: the same grid with {variant.overrides} applied last."


def reused_cell_seconds(ccfg: CompareConfig, todo: list[list[str]]) -> float:
    """The seconds the complete cells of ``ccfg`` not in ``todo`` took when they ran (their ``timing.total_s``)."""
    total = 0.0
    for args in grid(ccfg):
        if args in todo:
            continue
        r = previous(cell_config(args))
        if r is not None and r.timing:
            total += float(r.timing.get("total_s", 0.0))
    return total


def grid_stage(cfg: ExperimentConfig, exp_dir: Path, task: str, exports: dict[str, list[Stage]],
               console: Console = None, variant: VariantSpec | None = None) -> tuple[Stage, list[RunResult]]:
    """The fine-tune grid of ``task`` (:func:`medpretrain.pipeline.grid.run_grid`; cells reused by their own
    hash), of ``variant``'s arms when given. Returns the stage record and every cell's results (none for a dry
    run)."""
    ccfg = grid_config(cfg, exp_dir, task, exports, variant)
    h = stage_hash(hash_view(ccfg))  # execution-only options (workers, data.stream, ...) are not in it
    name = variant_label(task, variant)
    stage = Stage(name, h, str(exp_dir / "reports" / name / "report.md"), log=str(exp_dir / "logs" / f"{name}.log"))
    todo = pending(ccfg, ("complete", "unavailable"))  # unavailable arms are retried, but cost nothing
    if cfg.dry_run:
        stage.detail = f"{len(todo)} of {len(grid(ccfg))} runs to do"
        return stage, []
    _, src = resolve_synthetic(cell_overrides(cfg, task, variant), exp_dir, exports)
    drawn = ""
    if src is not None and pending(ccfg):  # data.synthetic=stage:<generator>: its samples before any cell runs
        sample = synthetic_stage(cfg, exp_dir, src, console)
        record(exp_dir, sample)
        drawn = f"; synthetic samples {sample.status} ({sample.wall_s:.0f} s): {sample.output}"
    kept = reused_cell_seconds(ccfg, todo)
    t0 = time.perf_counter()
    _, results = run_grid(ccfg, console)
    spent = time.perf_counter() - t0
    stage.status = "reused" if not todo else "run"
    # A grid partly computed now costs what ran now plus what its reused cells took when they ran (their own
    # seconds over the workers that shared the CPU), so the experiment's total is the whole grid's, not the part.
    workers = max(1, ccfg.workers)
    stage.wall_s = spent + kept / workers if todo else previous_wall(exp_dir, name, h)
    count = {s: sum(r.status == s for r in results) for s in STATUSES}
    stage.detail = (f"{count['complete']} complete, {count['unavailable']} unavailable, "
                    f"{count['failed']} failed of {len(results)} runs; "
                    f"{len(todo)} computed now ({spent:.0f} s)"
                    + (f" + {kept / workers:.0f} s of reused cells ({kept:.0f} s / {workers} workers)"
                       if todo and kept else "") + drawn)
    return stage, results
