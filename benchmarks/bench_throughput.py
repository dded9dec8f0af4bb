"""Throughput of the real entry scripts: images/s, and GPU utilisation and memory where a GPU is present (issue #8).

    .venv/bin/python benchmarks/bench_throughput.py                                  # CPU-sized defaults, ~6 min on a loaded 2-core CPU
    .venv/bin/python benchmarks/bench_throughput.py steps=200 pretrain_batch=256 finetune_batch=128 \\
        finetune_steps_per_epoch=0 finetune_short_steps=10 image_size=64 mixed_precision=bf16   # one GPU
    .venv/bin/python benchmarks/bench_throughput.py launch_args='[--config_file, configs/accelerate/multi_gpu.yaml, --num_processes, 4]'

Each stage is the project's own script launched through ``accelerate launch`` as a subprocess, for a fixed
number of optimizer steps, on ``dataset`` (PneumoniaMNIST) with ``arch`` (ResNet-18):

* ``simclr`` / ``moco`` (``pretrain/*.py``, ``train.max_steps=steps``) and ``vae`` (``generative/vae.py``):
  images/s from the rows of ``<run>/metrics.csv``, one row every ``log_every`` steps. The first window (the
  first ``log_every`` steps: allocator, cuDNN autotuning, first-touch of the cached split) is left out:
  images/s = images in the later windows / their time. SimCLR/MoCo log ``images_per_s`` per window (a
  window's time is its images / its rate); the VAE logs cumulative ``elapsed_s`` (time = the difference).
* ``finetune`` (``finetune/run.py``, ``init=scratch regime=full``): the script times whole epochs only
  (``epoch_s`` in ``metrics.csv``: ``optim.max_steps_per_epoch`` training steps plus one validation pass).
  It is run twice, with ``finetune_steps_per_epoch`` and ``finetune_short_steps`` steps per epoch; epoch 1
  (warm-up) is left out of both, and the difference of the mean epoch times over the difference of the steps
  is the time of one training step, free of the validation pass and other per-epoch costs. The long run's
  epochs give the whole-epoch rate (training images / epoch time, validation included) as a second row.

Where CUDA is available, ``nvidia-smi`` is polled every ``gpu_sample_ms`` in a background thread while each
run is alive; utilisation mean/max are over the samples between two lines the script prints (training start
to end, see ``STAGES``), peak memory is the largest ``memory.used`` of the GPUs the run used (device-wide, so
it includes other processes' memory: the value before the run is reported beside it). The bench process
itself never initialises CUDA (the device name comes from a short subprocess), so it holds no GPU memory.

Writes ``<out>.json`` (everything, including the exact commands and the raw GPU samples) and ``<out>.md``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

# The scripts under test set this too; the launcher and its children inherit it from here (libgomp reads it
# at load). PASSIVE: idle OpenMP threads sleep instead of spinning on a CPU shared with other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]

from medpretrain.config import load_config  # noqa: E402
from medpretrain.methods import registry  # noqa: E402
from medpretrain.utils import cpu_model  # noqa: E402

# stage -> (script, regex of the stdout line printed when training starts, regex of the line after it ends).
# The GPU utilisation window lies between the two lines; finetune's start line is the end of epoch 1, so its
# window, like its images/s, leaves the warm-up epoch out. Every self-supervised method of the registry runs
# through the one pretraining loop, which prints "<method>: <n> images (...)" when it starts and
# "backbone: <path>" when it has exported.
SELFSUP_MARKERS = (r"^[^:\s][^:]*: \d+ images ", r"^backbone: ")


def stage_table() -> dict[str, tuple[str, str, str]]:
    """The benchmarkable stages: every registered self-supervised method, the VAE, and fine-tuning."""
    selfsup = {name: (registry.stage(name).script, *SELFSUP_MARKERS) for name in registry.selfsup_methods()}
    return {**selfsup, "vae": (registry.stage("vae").script, r"^VAE ", r"^epoch \d+/"),
            "finetune": ("finetune/run.py", r"^epoch 1/", r"^epoch {epochs}/")}


STAGES = stage_table()


@dataclasses.dataclass
class ThroughputConfig:
    stages: list[str] = dataclasses.field(default_factory=lambda: ["simclr", "moco", "finetune", "vae"])
    """Any registered self-supervised method (``simclr``, ``moco``, ...), ``finetune``, ``vae``, run in this order."""
    dataset: str = "medmnist:pneumoniamnist"
    arch: str = "resnet18"
    stem: str = "auto"
    """``auto``: the small stem below 96 px (as every config in ``configs/``)."""
    image_size: int = 28
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Passed to every stage (pretraining and VAE: ``train.mixed_precision``; fine-tuning: the launcher's
    ``--mixed_precision``, which also overrides the value of an accelerate config file in ``launch_args``)."""
    steps: int = 20
    """Optimizer steps of each pretraining / VAE run."""
    log_every: int = 5
    """Steps per logged window of pretraining / VAE (the first window is warm-up and left out)."""
    pretrain_batch: int = 16
    """Images per process per step for SimCLR and MoCo (two views each)."""
    vae_batch: int = 16
    finetune_batch: int = 16
    finetune_epochs: int = 2
    """Epochs of each fine-tuning run (>= 2: epoch 1 is warm-up and left out)."""
    finetune_steps_per_epoch: int = 8
    """Training steps per epoch of the main fine-tuning run (0: the whole training split)."""
    finetune_short_steps: int = 2
    """Steps per epoch of the second, short fine-tuning run used to difference out the validation pass
    (0: skip it and report the whole-epoch rate only)."""
    launch_args: list[str] = dataclasses.field(default_factory=list)
    """``accelerate launch`` options; empty = one process (with ``--cpu`` and ``cores`` threads when no GPU)."""
    cores: int = 0
    """CPU threads per process when no GPU is used (0 = all logical CPUs)."""
    gpu_sample_ms: int = 500
    timeout_s: int = 1800
    """Per run; the run's process group is killed after this."""
    seed: int = 0
    work_dir: str = "runs/bench_throughput"
    keep_runs: bool = False
    out: str = "benchmarks/results/throughput"
    render_only: bool = False
    """Only rewrite the markdown from the existing JSON."""


# --------------------------------------------------------------------------------------------
# Parsing and aggregation (pure functions; tests/test_bench_throughput.py)
# --------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(row: dict[str, str], key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def logged_rate(rows: list[dict[str, str]], images_per_step: int, rate_key: str = "images_per_s") -> dict[str, Any]:
    """images/s over the windows after the first, from per-window rates (SimCLR/MoCo ``metrics.csv``).

    A window's images are ``(step - previous step) * images_per_step`` and its time is images / logged rate;
    the result is total images / total time of the kept windows (not a mean of rates). Rows without a rate
    (kNN rows) are ignored. With a single window it is kept and ``warmup_excluded`` is false.
    """
    windows, prev = [], 0
    for row in rows:
        rate, step = _num(row, rate_key), _num(row, "step")
        if rate is None or step is None:
            continue
        images = (step - prev) * images_per_step
        windows.append((images, images / rate))
        prev = step
    return _combine(windows)


def elapsed_rate(rows: list[dict[str, str]], images_per_step: int, time_key: str = "elapsed_s",
                 value_key: str = "loss") -> dict[str, Any]:
    """images/s over the windows after the first, from a cumulative time column (VAE ``metrics.csv``).

    Only training rows (``value_key`` present) count; the first window runs from the loop's start to the
    first row and is left out.
    """
    windows, prev_step, prev_t = [], 0.0, 0.0
    for row in rows:
        step, t = _num(row, "step"), _num(row, time_key)
        if step is None or t is None or _num(row, value_key) is None:
            continue
        windows.append(((step - prev_step) * images_per_step, t - prev_t))
        prev_step, prev_t = step, t
    return _combine(windows)


def _combine(windows: list[tuple[float, float]]) -> dict[str, Any]:
    if not windows:
        raise ValueError("no timed windows in metrics.csv")
    kept = windows[1:] if len(windows) > 1 else windows
    images, seconds = sum(w[0] for w in kept), sum(w[1] for w in kept)
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds, "windows": len(windows),
            "warmup_excluded": len(windows) > 1, "first_window_images_per_s": windows[0][0] / windows[0][1]}


def finetune_steps(train_size: int, batch: int, processes: int, max_steps_per_epoch: int) -> int:
    """Training steps per epoch of ``finetune/run.py``: its loader drops the last partial batch and accelerate
    shards the batches over the processes; ``optim.max_steps_per_epoch`` caps them."""
    full = (train_size // batch) // processes if train_size > batch else 1
    return min(full, max_steps_per_epoch) if max_steps_per_epoch else full


def epoch_times(rows: list[dict[str, str]]) -> list[float]:
    """``epoch_s`` of epochs 2.. (epoch 1 is warm-up), in epoch order."""
    timed = sorted((int(_num(r, "epoch") or 0), _num(r, "epoch_s")) for r in rows if _num(r, "epoch_s") is not None)
    return [t for e, t in timed if e >= 2]  # type: ignore[misc]


def finetune_rates(long_rows: list[dict[str, str]], long_steps: int, images_per_step: int,
                   short_rows: list[dict[str, str]] | None = None, short_steps: int = 0) -> dict[str, Any]:
    """Fine-tuning images/s from whole-epoch times (epochs >= 2).

    ``epoch_images_per_s``: training images / epoch time of the long run (validation pass included).
    ``step_images_per_s``: from two runs differing only in steps per epoch, one step takes
    ``(mean epoch_s long - mean epoch_s short) / (long_steps - short_steps)``; ``None`` when there is no short
    run or load noise made the difference non-positive. ``other_epoch_s`` is what the rest of an epoch costs
    (validation pass, loader start).
    """
    long_t = epoch_times(long_rows)
    if not long_t:
        raise ValueError("fine-tuning needs >= 2 epochs to leave the warm-up epoch out")
    out: dict[str, Any] = {"epoch_s": long_t, "epoch_images_per_s": long_steps * images_per_step / statistics.mean(long_t),
                           "step_images_per_s": None, "step_s": None, "other_epoch_s": None}
    if short_rows is not None and short_steps:
        short_t = epoch_times(short_rows)
        out["short_epoch_s"] = short_t
        if short_t and long_steps > short_steps:
            step_s = (statistics.mean(long_t) - statistics.mean(short_t)) / (long_steps - short_steps)
            if step_s > 0:
                out.update(step_s=step_s, step_images_per_s=images_per_step / step_s,
                           other_epoch_s=statistics.mean(short_t) - short_steps * step_s)
    return out


def parse_smi_line(line: str) -> tuple[int, float | None, float | None] | None:
    """One line of ``nvidia-smi --query-gpu=[index,]utilization.gpu,memory.used --format=csv,noheader,nounits``
    as (gpu index, utilisation %, memory MiB); ``[N/A]`` / ``[Not Supported]`` become ``None``; a line without
    the index field is GPU 0; a line with neither value (blank, a header, an error) is ``None``."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) == 2:
        parts = ["0", *parts]
    if len(parts) != 3:
        return None

    def value(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    index, util, mem = (value(p) for p in parts)
    if index is None or (util is None and mem is None):  # a header or an error line carries no sample
        return None
    return int(index), util, mem


def gpu_summary(samples: list[tuple[float, int, float | None, float | None]], start: float | None = None,
                end: float | None = None, gpus: set[int] | None = None) -> dict[str, Any]:
    """Utilisation mean/max over the samples in ``[start, end]`` (the whole list when either is ``None`` or the
    window holds no sample) and peak memory over all samples, of the GPUs in ``gpus`` (all when ``None``).
    Samples are ``(time, index, util %, memory MiB)``."""
    mine = [s for s in samples if gpus is None or s[1] in gpus]
    window = [s for s in mine if start is not None and end is not None and start <= s[0] <= end]
    used = window or mine
    util = [s[2] for s in used if s[2] is not None]
    mem = [s[3] for s in mine if s[3] is not None]
    return {"util_mean": statistics.mean(util) if util else None, "util_max": max(util) if util else None,
            "mem_peak_mib": max(mem) if mem else None, "samples": len(used),
            "window": "training" if window else "whole run"}


def launcher_processes(launch_args: list[str], root: Path = ROOT) -> int:
    """Processes ``accelerate launch`` will start: ``--num_processes`` wins, else the config file's value, else 1."""
    for i, arg in enumerate(launch_args):
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
        if arg == "--num_processes" and i + 1 < len(launch_args):
            return int(launch_args[i + 1])
    for i, arg in enumerate(launch_args):
        path = arg.split("=", 1)[1] if arg.startswith("--config_file=") else (
            launch_args[i + 1] if arg == "--config_file" and i + 1 < len(launch_args) else None)
        if path:
            import yaml

            return int((yaml.safe_load((root / path).read_text()) or {}).get("num_processes", 1))
    return 1


# --------------------------------------------------------------------------------------------
# Machine, GPU sampling, running one stage
# --------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    import accelerate
    import lightly
    import torch
    import torchvision

    # CUDA is queried in a child process so that this one never creates a context (which would hold GPU
    # memory for the whole benchmark and show up in every run's memory.used).
    probe = subprocess.run([sys.executable, "-c", "import torch; n = torch.cuda.device_count() if "
                            "torch.cuda.is_available() else 0; print(n); [print(torch.cuda.get_device_name(i)) "
                            "for i in range(n)]"], capture_output=True, text=True)
    lines = probe.stdout.split("\n") if probe.returncode == 0 else ["0"]
    n_gpu = int(lines[0] or 0)
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightly": lightly.__version__, "accelerate": accelerate.__version__,
            "cuda_available": n_gpu > 0, "gpus": lines[1:1 + n_gpu], "torch_cuda": torch.version.cuda}


class GpuSampler:
    """``nvidia-smi`` polled in a background thread: ``samples`` holds ``(monotonic time, index, util %, MiB)``."""

    def __init__(self, interval_ms: int):
        self.cmd = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                    "-lms", str(interval_ms)]
        self.samples: list[tuple[float, int, float | None, float | None]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parsed = parse_smi_line(line)
            if parsed is not None:
                self.samples.append((time.monotonic(), *parsed))

    def __enter__(self) -> GpuSampler:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.thread is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=10)


def gpu_snapshot() -> list[tuple[int, float | None, float | None]]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return [p for p in map(parse_smi_line, out.stdout.splitlines()) if p is not None]


def launch_prefix(cfg: ThroughputConfig, cuda: bool, cores: int) -> list[str]:
    args = list(cfg.launch_args) or (
        ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
        + ([] if cuda else ["--cpu", "--num_cpu_threads_per_process", str(cores)]))
    return ["-m", "accelerate.commands.launch", *args, "--mixed_precision", cfg.mixed_precision]


def stage_command(stage: str, cfg: ThroughputConfig, run_dir: Path, prefix: list[str], steps_per_epoch: int = 0) -> list[str]:
    # Paths relative to the project (the scripts run there) keep the recorded commands short and portable.
    run_dir = run_dir.relative_to(ROOT) if run_dir.is_absolute() else run_dir
    # "no" is the scripts' default; passed only otherwise (as a bare value YAML would read `no` as false).
    mp = [f"train.mixed_precision={cfg.mixed_precision}"] if cfg.mixed_precision != "no" else []
    common = [f"data.dataset={cfg.dataset}", f"data.image_size={cfg.image_size}", f"backbone.arch={cfg.arch}",
              f"backbone.stem={cfg.stem}"]
    if stage in registry.selfsup_methods():
        args = [f"train.max_steps={cfg.steps}", f"train.batch_size={cfg.pretrain_batch}", f"train.log_every={cfg.log_every}",
                "train.knn_every=-1", "train.checkpoint_every=0", *mp, f"train.seed={cfg.seed}", f"out_dir={run_dir.parent}", f"run_name={run_dir.name}"]
    elif stage == "vae":
        args = [f"train.max_steps={cfg.steps}", f"train.batch_size={cfg.vae_batch}", f"train.log_every={cfg.log_every}",
                "train.checkpoint_every=0", *mp, "train.log_with=none",
                f"train.seed={cfg.seed}", f"out_dir={run_dir.parent}", f"run_name={run_dir.name}"]
    elif stage == "finetune":
        args = ["--config", "configs/finetune.yaml", "init=scratch", "regime=full", f"seed={cfg.seed}",
                f"optim.batch_size={cfg.finetune_batch}", f"optim.epochs={cfg.finetune_epochs}",
                f"optim.max_steps_per_epoch={steps_per_epoch}", "n_bootstrap=100", f"output_dir={run_dir}"]
    else:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
    return [*prefix, STAGES[stage][0], *common, *args]


def show(cmd: list[str]) -> str:
    """The command as a shell line, with this interpreter written relative to the project when inside it."""
    exe = Path(sys.executable).absolute()  # not resolved: .venv/bin/python is a link out of the project
    return shlex.join([str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe), *cmd])


def run_stage(cmd: list[str], markers: tuple[str, str], log_path: Path, cuda: bool, sample_ms: int,
              timeout_s: int) -> dict[str, Any]:
    """Run one launch, timestamping its stdout lines (for the GPU window) and sampling the GPU meanwhile."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start_re, end_re = (re.compile(m) for m in markers)
    t_start = t_end = None
    lines: list[str] = []
    before = gpu_snapshot() if cuda else []
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = loadavg()
    sampler = GpuSampler(sample_ms) if cuda else None
    with open(log_path.with_suffix(".stderr"), "w") as err, sampler or contextlib.nullcontext():
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        # Our own child's process group, so that a hung multi-process launch goes down whole.
        timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            lines.append(line)
            if t_start is None and start_re.search(line):
                t_start = now
            elif t_start is not None and t_end is None and end_re.search(line):
                t_end = now
        rc = proc.wait()
        timer.cancel()
        wall = time.monotonic() - t0
    log_path.write_text("".join(lines))
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        tail = "".join(lines)[-3000:] + log_path.with_suffix(".stderr").read_text()[-3000:]
        raise RuntimeError(f"{show(cmd)} failed with exit status {rc}:\n{tail}")
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"returncode": rc, "wall_s": wall, "cpu_s": cpu_s, "cpu_cores_busy": cpu_s / wall,
            "load_before": load_before, "load_after": loadavg(), "gpu_before": before,
            "window_s": (t_end - t_start) if t_start is not None and t_end is not None else None,
            "samples": sampler.samples if sampler is not None else [],
            "window": (t_start, t_end), "t0": t0, "device_line": next((m.group(1) for m in map(
                re.compile(r"process\(es\) on (\S+?);").search, lines) if m), None)}


def device_label(device: str | None, info: dict[str, Any], cores: int, cuda: bool) -> str:
    if device is None:
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and info["gpus"]:
        return info["gpus"][0]
    return f"CPU ({cores} threads)"


def gpu_fields(res: dict[str, Any], processes: int) -> dict[str, Any] | None:
    if not res["samples"] and not res["gpu_before"]:
        return None
    gpus = set(range(processes))
    summary = gpu_summary(res["samples"], *res["window"], gpus=gpus)
    summary["mem_before_mib"] = max((m for i, _, m in res["gpu_before"] if i in gpus and m is not None), default=None)
    return summary


def bench(cfg: ThroughputConfig) -> dict[str, Any]:
    from medpretrain.checkpoint import read_meta

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {sorted(STAGES)}")
    if "finetune" in cfg.stages and cfg.finetune_epochs < 2:
        raise ValueError("finetune_epochs must be >= 2 (epoch 1 is warm-up and left out)")
    if cfg.finetune_short_steps and cfg.finetune_steps_per_epoch and cfg.finetune_short_steps >= cfg.finetune_steps_per_epoch:
        raise ValueError("finetune_short_steps must be below finetune_steps_per_epoch")
    info = machine()
    cuda = info["cuda_available"] and "--cpu" not in cfg.launch_args
    cores = cfg.cores or os.cpu_count() or 1
    prefix = launch_prefix(cfg, cuda, cores)
    nproc = launcher_processes(cfg.launch_args)
    work = ROOT / cfg.work_dir / time.strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info,
                           "config": dataclasses.asdict(cfg), "cores": cores, "cuda_used": cuda,
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_start": loadavg(),
                           "work_dir": str(work.relative_to(ROOT)), "rows": [], "runs": {}}
    t0 = time.perf_counter()

    def launch(name: str, stage: str, run_dir: Path, steps_per_epoch: int = 0) -> dict[str, Any]:
        cmd = stage_command(stage, cfg, run_dir, prefix, steps_per_epoch)
        start, end = STAGES[stage][1:]
        end = end.format(epochs=cfg.finetune_epochs)
        print(f"[{name}] {show(cmd)}", flush=True)
        r = run_stage(cmd, (start, end), run_dir.parent / f"{run_dir.name}.log", cuda, cfg.gpu_sample_ms, cfg.timeout_s)
        r["command"] = show(cmd)
        # Raw samples as (seconds since the launch, gpu, util %, MiB); the window likewise.
        res["runs"][name] = {k: v for k, v in r.items() if k not in ("samples", "window", "t0")} | {
            "gpu_samples": [(round(t - r["t0"], 3), *rest) for t, *rest in r["samples"]],
            "window_since_launch_s": [None if t is None else round(t - r["t0"], 3) for t in r["window"]]}
        return r

    def row(stage: str, r: dict[str, Any], processes: int, batch: int, rate: dict[str, Any], how: str) -> None:
        device = r["device_line"] or ("cuda" if cuda else "cpu")
        res["rows"].append({"stage": stage, "device": device_label(device, info, cores, cuda), "processes": processes,
                            "batch_per_process": batch, "global_batch": batch * processes,
                            "image_size": cfg.image_size, "images_per_s": rate.get("images_per_s"), "how": how,
                            "rate": rate, "gpu": gpu_fields(r, processes), "wall_s": r["wall_s"],
                            "cpu_cores_busy": r["cpu_cores_busy"], "command": r["command"]})
        print(f"[{stage}] {rate.get('images_per_s') or float('nan'):.1f} images/s ({how}); "
              f"wall {r['wall_s']:.0f} s; gpu {res['rows'][-1]['gpu']}", flush=True)

    for stage in cfg.stages:
        if stage != "finetune":  # a pretraining method or the VAE
            run_dir = work / stage / "bench"
            r = launch(stage, stage, run_dir)
            meta = read_meta(run_dir / "backbone.safetensors")
            processes = int((meta.extra or {}).get("processes") or nproc)
            batch = cfg.pretrain_batch if stage != "vae" else cfg.vae_batch
            rows = read_csv(run_dir / "metrics.csv")
            if stage == "vae":
                rate = elapsed_rate(rows, batch * processes)
                how = "metrics.csv elapsed_s deltas, first window left out"
            else:
                rate = logged_rate(rows, batch * processes)
                how = "metrics.csv images_per_s windows, first window left out"
            row(stage, r, processes, batch, rate, how)
        else:
            long_dir = work / "finetune" / "long"
            r = launch("finetune", stage, long_dir, cfg.finetune_steps_per_epoch)
            results = json.loads((long_dir / "results.json").read_text())
            processes = int(results["timing"]["processes"])
            r["device_line"] = results["timing"]["device"]
            steps = finetune_steps(results["data"]["train_size"], cfg.finetune_batch, processes,
                                   cfg.finetune_steps_per_epoch)
            short_rows, short_steps = None, 0
            if cfg.finetune_short_steps:
                short_dir = work / "finetune" / "short"
                launch("finetune_short", stage, short_dir, cfg.finetune_short_steps)
                short_rows, short_steps = read_csv(short_dir / "metrics.csv"), cfg.finetune_short_steps
            ft = finetune_rates(read_csv(long_dir / "metrics.csv"), steps, cfg.finetune_batch * processes,
                                short_rows, short_steps)
            ft.update(steps_per_epoch=steps, short_steps_per_epoch=short_steps, train_size=results["data"]["train_size"])
            if cfg.finetune_short_steps:
                row("finetune (training steps)", r, processes, cfg.finetune_batch,
                    {**ft, "images_per_s": ft["step_images_per_s"]},
                    f"epoch_s of {steps}- vs {short_steps}-step epochs differenced, epoch 1 left out")
            row("finetune (whole epoch)", r, processes, cfg.finetune_batch, {**ft, "images_per_s": ft["epoch_images_per_s"]},
                f"{steps} steps x {cfg.finetune_batch * processes} images / epoch_s (incl. validation), epoch 1 left out")
    res["load_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t0
    if not cfg.keep_runs:
        shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    m, c = res["machine"], res["config"]
    gpu_note = (f"GPU: {', '.join(m['gpus'])} (CUDA {m['torch_cuda']}); utilisation and memory sampled with nvidia-smi "
                f"every {c['gpu_sample_ms']} ms." if res["cuda_used"] else
                "**No GPU was available in this session**, so GPU images/s, GPU utilisation and GPU memory were not "
                "measured: every number below is CPU images/s, and the GPU columns say \"no GPU\".")
    lines = [
        "# Throughput benchmark: images/s of the entry scripts, GPU utilisation",
        "",
        f"Measured {res['started']} by `benchmarks/bench_throughput.py` on {m['cpu']} ({m['logical_cpus']} logical CPUs"
        + ("" if res["cuda_used"] else f", {res['cores']} threads per process") + f"), {m['platform']}, Python "
        f"{m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, accelerate {m['accelerate']}, lightly "
        f"{m['lightly']}. {gpu_note} The CPU was shared with other jobs: load average {res['load_start']} before, "
        f"{res['load_end']} after (1/5/15 min), so CPU rates are noisy. `OMP_WAIT_POLICY={res['omp_wait_policy']}`.",
        "",
        f"Settings: `{c['dataset']}`, {c['arch']} (stem `{c['stem']}`), {c['image_size']} px, mixed precision "
        f"`{c['mixed_precision']}`; pretraining/VAE {c['steps']} optimizer steps logged every {c['log_every']}; "
        f"fine-tuning (`init=scratch regime=full`) {c['finetune_epochs']} epochs of "
        f"{c['finetune_steps_per_epoch'] or 'all'} steps, and of {c['finetune_short_steps']} steps for the "
        f"difference; launcher options `{shlex.join(c['launch_args']) or '(default: one process)'}`.",
        "",
        "| stage | device | processes | batch per process | image size | images/s | GPU util mean / max % | peak GPU memory MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        g = r["gpu"]
        util = (f"{_f(g['util_mean'], '{:.0f}')} / {_f(g['util_max'], '{:.0f}')}" if g else "no GPU")
        mem = (f"{_f(g['mem_peak_mib'], '{:.0f}')} (before: {_f(g['mem_before_mib'], '{:.0f}')})" if g else "no GPU")
        lines.append(f"| {r['stage']} | {r['device']} | {r['processes']} | {r['batch_per_process']} | {r['image_size']} px "
                     f"| {_f(r['images_per_s'])} | {util} | {mem} |")
    lines += ["", "## How the numbers are made", "",
              "Each stage is the project's entry script launched by `accelerate launch` in a subprocess (commands "
              "below). images/s counts images per optimizer step over all processes (a SimCLR/MoCo image gives "
              "two views; MoCo backpropagates one), measured inside the script, never the subprocess's start-up:",
              ""]
    for r in res["rows"]:
        rate = r["rate"]
        extra = ""
        if "first_window_images_per_s" in rate:
            extra = (f" Kept {rate['images']:.0f} images in {rate['seconds']:.1f} s over {rate['windows'] - 1} of "
                     f"{rate['windows']} windows; the first (warm-up) window ran at {rate['first_window_images_per_s']:.1f} images/s.")
        elif "epoch_s" in rate:
            long_t = ", ".join(f"{t:.1f}" for t in rate["epoch_s"])
            if "training steps" in r["stage"]:
                extra = (f" Epochs 2.. took {long_t} s with {rate['steps_per_epoch']} steps and "
                         f"{', '.join(f'{t:.1f}' for t in rate.get('short_epoch_s') or [])} s with "
                         f"{rate['short_steps_per_epoch']} steps: one step {_f(rate['step_s'], '{:.3f}')} s, the rest of "
                         f"an epoch (validation pass over 524 images, loader start) {_f(rate['other_epoch_s'])} s.")
            else:
                extra = (f" Epochs 2.. took {long_t} s (train split {rate['train_size']} images, capped at "
                         f"{rate['steps_per_epoch']} steps per epoch).")
        lines.append(f"- **{r['stage']}**: {r['how']}.{extra} Wall time of the run {r['wall_s']:.0f} s; CPU cores busy "
                     f"(child CPU time / wall) {r['cpu_cores_busy']:.2f}.")
    if c["finetune_epochs"] == 2 and "finetune" in c["stages"]:
        lines += ["", "With 2 epochs per fine-tuning run only one epoch of each run is timed, so the differenced step "
                  "rate rests on two epoch times and is as noisy as the load on the machine."]
    lines += ["", "GPU utilisation (when measured) is the mean / max of `utilization.gpu` samples of the GPUs the run "
              "used, between the line the script prints when training starts and the line after it ends (fine-tuning: "
              "from the end of epoch 1 to the end of the last epoch, so validation passes are inside); peak memory is "
              "the largest device-wide `memory.used` during the run, with the value just before it for comparison. "
              "Raw samples are in `throughput.json`.",
              "", "## Commands", "", "```"]
    lines += [f"{r['command']}" for r in res["runs"].values()]
    lines += ["```", "", "Each run wrote into a fresh folder under `" + res["work_dir"] + "` (removed afterwards unless "
              "`keep_runs=true`).", ""]
    if not res["cuda_used"]:
        lines += ["## On a GPU machine", "",
                  "Nothing here was measured on a GPU. To record GPU images/s and utilisation (issue #8), run, with the "
                  "data under `$MEDPRETRAIN_DATA`:", "", "```",
                  "export OMP_WAIT_POLICY=PASSIVE MEDPRETRAIN_DATA=/path/to/shared/data",
                  ".venv/bin/python benchmarks/bench_throughput.py steps=200 log_every=20 pretrain_batch=256 vae_batch=256 "
                  "finetune_batch=128 finetune_epochs=3 finetune_steps_per_epoch=0 finetune_short_steps=10 image_size=64 "
                  "mixed_precision=bf16",
                  "# several GPUs (DDP), one process per GPU:",
                  ".venv/bin/python benchmarks/bench_throughput.py steps=200 log_every=20 pretrain_batch=256 vae_batch=256 "
                  "finetune_batch=128 finetune_steps_per_epoch=0 finetune_short_steps=5 image_size=64 mixed_precision=bf16 "
                  "launch_args='[--config_file, configs/accelerate/multi_gpu.yaml, --num_processes, 4]'",
                  "```", "",
                  "It writes the same two files, naming the GPU (`torch.cuda.get_device_name`) in the device column.", ""]
    lines += [f"Total benchmark wall time: {res['wall_s']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(ThroughputConfig, argv)
    out = ROOT / cfg.out
    if cfg.render_only:
        write_markdown(out.with_suffix(".md"), json.loads(out.with_suffix(".json").read_text()))
        return
    res = bench(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), res)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
