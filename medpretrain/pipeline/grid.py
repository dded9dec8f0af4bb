"""Fine-tune grids: expand ``inits x regimes x label budgets x seeds`` into runs, find the cells still to do,
launch them, and write one comparison report.

Each cell is one ``finetune/run.py`` run (launched as ``accelerate launch finetune/run.py ...``, with
``torchrun``, or in this process with ``launcher=inprocess``) writing to
``<runs_dir>/finetune/<task>/<init>/<regime>/<budget>/seed<k>``. A cell whose ``results.json`` is complete
and carries the same config hash is skipped, so an interrupted grid continues where it stopped. Unavailable
arms (ImageNet weights missing, no pretraining export) are reported as such, never replaced by random
weights. For a segmentation base config (``task: segmentation``) the budgets are numbers of annotated
training images (``n_train_images``) and Dice is the headline. Seed ensembles: :mod:`.ensembles`; the report:
:func:`medpretrain.report.build_report` in ``<runs_dir>/reports/<name>/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medpretrain.config import load_config
from medpretrain.finetune import SCRIPT as FINETUNE_SCRIPT
from medpretrain.finetune import (
    FinetuneConfig,
    failed_result,
    init_label,
    main_in_process,
    output_dir,
    run_hash,
)
from medpretrain.pipeline.console import Console, say
from medpretrain.pipeline.ensembles import ensembles
from medpretrain.report import build_report
from medpretrain.results import ResultsError, RunResult, read_results
from medpretrain.utils import atomic_write_text

LOCAL_SPLIT_NOTES = {
    "pneumoniamnist": "PneumoniaMNIST: the local train split has 3882 images (388 normal / 3494 pneumonia), "
                      "smaller than the official MedMNIST v2 split (4708: 1214 / 3494); val and test are official. "
                      "Compare with published numbers accordingly.",
    "busi": "BUSI has no official split: a stratified, seeded train/val/test split is used (data.split_seed).",
}


@dataclass
class CompareConfig:
    base_config: str = "configs/finetune.yaml"
    """The fine-tuning config every cell starts from (``finetune/run.py --config``)."""
    inits: list[str] = field(default_factory=lambda: ["scratch", "selfsup", "imagenet"])
    """Init names (``finetune/run.py init=``), or ``<label>=<checkpoint path>`` to name a checkpoint in the report."""
    regimes: list[str] = field(default_factory=lambda: ["linear", "full"])
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    n_train_images: list[int] = field(default_factory=lambda: [2, 5, 0])
    """Segmentation only: label budgets as numbers of annotated training images (0 = all)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    lrs: list[float] = field(default_factory=list)
    """Optional learning-rate axis: every init runs every LR (``optim.lr``, folder level ``lr<lr>``); the report
    picks each init's LR on validation (``metrics.val_best``). Empty: the base config's ``optim.lr`` only."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides passed to every run (e.g. ``optim.epochs=5``)."""
    runs_dir: str = "runs"
    name: str = "default"
    """Report folder: ``<runs_dir>/reports/<name>``."""
    title: str = "Initialisation comparison"
    launcher: Literal["accelerate", "torchrun", "inprocess"] = "accelerate"
    launch_args: list[str] = field(default_factory=lambda: ["--num_processes", "1"])
    """Arguments for ``accelerate launch`` (e.g. ``[--config_file, configs/accelerate/multi_gpu.yaml]``) or
    ``torchrun`` (e.g. ``[--nproc_per_node, 2]``: several CPU processes)."""
    collect_only: bool = False
    """Do not run anything: report on the results that exist."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the ensemble rows (runs use their own config's ``n_bootstrap``)."""
    notes: list[str] = field(default_factory=list)
    workers: int = 1
    """``launcher=inprocess`` only: cells run at once, each in its own worker process with
    ``CPUs // workers`` threads and its output in the cell's ``run.log``. Small CPU models use several threads
    poorly, so several one-thread cells at once can finish a grid sooner than one cell at a time on every
    thread: ``benchmarks/bench_grid_workers.py`` measures it. Results do not depend on it beyond float rounding."""


def cell_config(argv: list[str]) -> FinetuneConfig:
    """A cell's fine-tune config, validated against ``FinetuneConfig`` (``ConfigError`` before any launch)."""
    return load_config(FinetuneConfig, argv)


def base_task(cfg: CompareConfig) -> str:
    """``classification`` or ``segmentation``: the task of the base config with the overrides."""
    return cell_config(["--config", cfg.base_config, *cfg.overrides]).task


def cell_argv(cfg: CompareConfig, init: str, regime: str, fraction: float, seed: int,
              task: str = "classification", lr: float | None = None) -> list[str]:
    """``finetune/run.py`` arguments of one cell (``fraction``: the number of images for segmentation; ``lr``:
    a point of the LR axis, after the overrides so that it wins)."""
    budget = f"seg.n_train_images={int(fraction)}" if task == "segmentation" else f"data.label_fraction={fraction}"
    label, sep, path = init.partition("=")
    named = [f"init={path}", f"init_name={label}"] if sep else [f"init={init}"]
    # resume=auto: the grid owns its cells' folders, so a killed cell continues from its last epoch
    return ["--config", cfg.base_config, *named, f"regime={regime}", budget,
            f"seed={seed}", f"runs_dir={cfg.runs_dir}", *cfg.overrides,
            *([f"optim.lr={lr}", f"run_tag=lr{lr:g}"] if lr is not None else []), "resume=auto"]


def grid(cfg: CompareConfig) -> list[list[str]]:
    """Every cell's arguments, in report order: inits, regimes, LRs (when ``lrs`` is set), budgets, seeds."""
    task = base_task(cfg)
    budgets: list[float] = [float(n) for n in cfg.n_train_images] if task == "segmentation" else cfg.label_fractions
    lrs: list[float | None] = list(cfg.lrs) if cfg.lrs else [None]
    return [cell_argv(cfg, replicate(i, k), r, f, s, task, lr) for i in cfg.inits for r in cfg.regimes for lr in lrs
            for f in budgets for k, s in enumerate(cfg.seeds)]


def replicate(init: str, k: int) -> str:
    """``<label>=<path0>|<path1>|...`` (an arm pretrained with several seeds) -> the replicate that fine-tune
    seed number ``k`` starts from (``k mod n``); any other init is returned as it is."""
    label, sep, paths = init.partition("=")
    if not sep or "|" not in paths:
        return init
    reps = paths.split("|")
    return f"{label}={reps[k % len(reps)]}"


def previous(run_cfg: FinetuneConfig, status: tuple[str, ...] = ("complete",)) -> RunResult | None:
    """The results a cell left with the same config hash and one of ``status``, else None (also for a
    ``results.json`` that cannot be read: the cell runs again and rewrites it)."""
    try:
        existing = read_results(output_dir(run_cfg) / "results.json", missing_ok=True)
    except ResultsError:
        return None
    if existing and existing.config_hash == run_hash(run_cfg) and existing.status in status:
        return existing
    return None


def pending(cfg: CompareConfig, status: tuple[str, ...] = ("complete",)) -> list[list[str]]:
    """The cells of the grid without results of ``status`` (unavailable arms are retried on every run: the
    weights may have appeared; ``status=("complete", "unavailable")`` leaves them out)."""
    return [a for a in grid(cfg) if previous(cell_config(a), status) is None]


def run_inprocess(argv: list[str], log_path: Path) -> int:
    """Run ``finetune/run.py``'s ``main(argv)`` in this process (:func:`medpretrain.finetune.main_in_process`) and
    return its exit status. An exception that escapes it is written to ``log_path`` and counts as status 1: one
    broken cell must not stop the grid; it is reported as failed."""
    try:
        return main_in_process(argv)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"{type(e).__name__}: {e}\n")
        return 1


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died and the process was re-parented)."""
    while True:
        time.sleep(every_s)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(threads: int) -> None:
    """A grid worker process: ``threads`` torch threads (the CPUs shared by the workers), and a watchdog that
    ends the worker when the grid's process dies: a killed experiment (SIGTERM / SIGKILL of the orchestrator)
    must not leave its cells running, writing into folders a restarted grid is about to use."""
    import threading

    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()


def run_logged(argv: list[str], log_path: Path) -> tuple[int, float]:
    """:func:`run_inprocess` with this process's stdout and stderr (file descriptors, so progress bars and
    child libraries too) in ``log_path``: a grid worker's cell. Returns (exit status, seconds it ran)."""
    t = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            return run_inprocess(argv, log_path), time.perf_counter() - t
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def launch(cfg: CompareConfig, argv: list[str], log_path: Path) -> int:
    """One run; its output goes to ``log_path`` (``inprocess``: to this process's streams). Returns the exit code."""
    if cfg.launcher == "inprocess":
        return run_inprocess(argv, log_path)
    which = ["--torchrun"] if cfg.launcher == "torchrun" else []  # medpretrain.launch: the child's exit status
    cmd = [sys.executable, "-m", "medpretrain.launch", *which, *cfg.launch_args, str(FINETUNE_SCRIPT), *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=os.getcwd()).returncode


def run_grid(cfg: CompareConfig, console: Console = None) -> tuple[Path, list[RunResult]]:
    """Run the missing cells of ``cfg``'s grid (none with ``collect_only``), write the report; return its path
    and every cell's results (complete, unavailable or failed; ``run_dir`` set), in grid order. Progress, one
    line per cell, goes to ``console``. ``workers > 1`` (in-process launcher): that many cells at once."""
    cells = grid(cfg)
    done: dict[int, RunResult | None] = {}
    todo: list[tuple[int, str, list[str]]] = []
    t0 = time.perf_counter()
    for n, argv_cell in enumerate(cells, 1):
        run_cfg = cell_config(argv_cell)  # validates the cell before launching
        out = output_dir(run_cfg)
        existing = previous(run_cfg, ("complete", "unavailable", "failed"))
        budget = (f"{run_cfg.seg.n_train_images or 'all'} images" if run_cfg.task == "segmentation"
                  else f"{run_cfg.data.label_fraction:g}")
        init = init_label(run_cfg.init, run_cfg.init_name)
        label = f"[{n}/{len(cells)}] {init} / {run_cfg.regime} / {budget} / seed {run_cfg.seed}"
        if existing and existing.status == "complete":
            say(console, f"{label}: done ({out})")
            done[n] = existing
        elif cfg.collect_only:
            say(console, f"{label}: missing (collect_only)")
        else:
            todo.append((n, label, argv_cell))
            done[n] = existing  # replaced when the cell has run
    workers = max(1, min(cfg.workers, len(todo))) if cfg.launcher == "inprocess" else 1
    if workers == 1:
        for n, label, argv_cell in todo:
            say(console, f"{label}: running -> {output_dir(cell_config(argv_cell))}")
            t = time.perf_counter()
            code = launch(cfg, argv_cell, _fresh(argv_cell) / "run.log")
            done[n] = _collect(argv_cell, code, label, time.perf_counter() - t, console)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        say(console, f"{len(todo)} cells on {workers} worker processes of {threads} thread(s); each cell's "
                     f"output in its run.log")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            started = {}
            for n, label, argv_cell in todo:
                say(console, f"{label}: queued -> {output_dir(cell_config(argv_cell))}")
                started[pool.submit(run_logged, argv_cell, _fresh(argv_cell) / "run.log")] = (
                    n, label, argv_cell, time.perf_counter())
            for future in as_completed(started):
                n, label, argv_cell, t = started[future]
                seconds = time.perf_counter() - t  # a dead worker's cell: since it was queued
                try:
                    code, seconds = future.result()  # the cell's own time, not its wait in the queue
                except Exception as e:  # noqa: BLE001 - a dead worker fails its cell, not the grid
                    code = 1
                    with (output_dir(cell_config(argv_cell)) / "run.log").open("a") as fh:
                        fh.write(f"{type(e).__name__}: {e}\n")
                done[n] = _collect(argv_cell, code, label, seconds, console)
    results = []
    for n in sorted(done):
        existing = done[n]
        if existing:
            if existing.run_dir is None:
                existing.run_dir = str(output_dir(cell_config(cells[n - 1])))
            results.append(existing)

    report = grid_report(cfg, results)
    say(console, f"report: {report} ({time.perf_counter() - t0:.0f}s)")
    return report, results


CELL_MARKER = "grid_cell.json"
"""Written into a cell's folder before it runs: the cell's config hash, so a later grid can tell an interrupted run
of this cell (resumed from its checkpoints) from one of another config (emptied first)."""


def _fresh(argv_cell: list[str]) -> Path:
    """The cell's folder, ready to run the cell: emptied when it holds results (of another config, an unavailable
    arm or unreadable ones: :func:`pending` found none to keep) or the partial run of another config (its
    checkpoints must not be resumed: ``resume=auto`` would continue the other config's budget); then marked
    with :data:`CELL_MARKER`. Only an interrupted run of this very cell is left for ``resume=auto``."""
    run_cfg = cell_config(argv_cell)
    out, h = output_dir(run_cfg), run_hash(run_cfg)
    if out.exists():
        try:
            mine = json.loads((out / CELL_MARKER).read_text()).get("config_hash") == h
        except (OSError, ValueError, AttributeError):
            mine = False
        if (out / "results.json").exists() or not mine:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CELL_MARKER, json.dumps({"config_hash": h}) + "\n")
    return out


def _collect(argv_cell: list[str], code: int, label: str, seconds: float, console: Console) -> RunResult | None:
    """The results a launched cell wrote (a failed result, with its log's tail, when it exited non-zero
    without an unavailable result of its config)."""
    run_cfg = cell_config(argv_cell)
    out = output_dir(run_cfg)
    try:
        existing = read_results(out / "results.json", missing_ok=True)
    except ResultsError:
        existing = None
    if code != 0 and not (existing and existing.status == "unavailable" and existing.config_hash == run_hash(run_cfg)):
        tail = (out / "run.log").read_text()[-2000:] if (out / "run.log").exists() else ""
        existing = failed_result(run_cfg, f"exit code {code}; log {out / 'run.log'}", tail)
    say(console, f"{label}: {existing.status if existing else 'no results'} in {seconds:.0f}s")
    return existing


def grid_report(cfg: CompareConfig, results: list[RunResult], notes: list[str] | None = None) -> Path:
    """Write the report of ``results`` (cells of ``cfg``'s grid, or of several grids) to
    ``<runs_dir>/reports/<name>/`` with ``cfg``'s notes, ``notes`` and the protocol remarks; return its path."""
    notes = [*cfg.notes, *(notes or [])]
    for key, note in LOCAL_SPLIT_NOTES.items():
        if any(key in str(((r.config or {}).get("data") or {}).get("dataset", "")).lower() for r in results):
            notes.append(note)
    budgets = (f"annotated images {cfg.n_train_images} (0 = all)" if base_task(cfg) == "segmentation"
               else f"label fractions {cfg.label_fractions}")
    notes.append(f"Grid: inits {cfg.inits}, regimes {cfg.regimes}, {budgets}, "
                 f"seeds {cfg.seeds}; base config `{cfg.base_config}`"
                 + (f", overrides {cfg.overrides}" if cfg.overrides else "") + ".")
    return build_report([r.to_dict() for r in results], Path(cfg.runs_dir) / "reports" / cfg.name,
                        title=cfg.title, ensembles=ensembles(results, cfg.n_bootstrap), notes=notes)
