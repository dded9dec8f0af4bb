"""Scale (issue 21): a generated study of synthetic 16-bit DICOM files, indexed and cached, then SimCLR pretraining
from the cache against the in-memory path; writes ``benchmarks/results/scale.json`` + ``scale.md``.

    .venv/bin/python benchmarks/bench_scale.py                                   # 50 000 files: ~26 GB of temporary DICOM
    .venv/bin/python benchmarks/bench_scale.py --n 300 --steps 5 --batch 8 --arch cbr_tiny --out /tmp/scale   # smoke run
    .venv/bin/python benchmarks/bench_scale.py --runs cache,memory,stream     # without the reference run on the device

What it does, in order (everything under a fresh folder in ``--tmp-dir``, deleted at the end unless ``--keep``):

1. **Generate** ``--n`` DICOM files of 512x512 16-bit pixels (12 bits stored, MONOCHROME2, a window centre / width)
   with pydicom, in ``--workers`` processes: chest-radiograph-like images (body outline, two lungs, spine, ribs, a
   smooth exposure gradient, noise; a bright nodule in the ``abnormal`` ones), 1-3 files per patient. Every file
   carries a patient name and ID (``MPXSCALENAME^...``, ``MPXSCALEID...``, random per patient) and a file name
   (``mpxscalefile_<k>.dcm``) that must not reach the cache. A manifest CSV (``image_path,label,patient``, the
   patient column holding the PatientID as a hospital export would) lists all files; a second one its first
   ``--subset`` rows (default ``n // 10``).
2. **Cache** the full manifest at ``--image-size`` (128 px) with ``data.cache=on`` and ``--workers`` decoding processes
   (:func:`medpretrain.data.cache.build_cache`): wall time (planning included), files/s, bytes on disk. Every file of
   the cache is then searched for the identifiers' markers, the file-name marker and the temporary folder's path.
3. **Index** the subset for ``data.stream=on`` (:func:`medpretrain.data.stream.build_stream_index`): time and bytes.
4. **Pretrain** SimCLR (``pretrain/simclr.py``, one process, on the GPU when there is one) for ``--steps`` steps of
   ``--batch`` images at ``--image-size`` px on ``split=all``, four times: from the cache on the full set and, on the
   subset, in memory (the same DataLoader with ``--workers`` workers: the run the goal compares with), in memory with
   ``train.cache_on_device=true`` (the default pretraining path, for reference) and streamed. images/s come from
   ``metrics.csv`` (one row every ``--log-every`` steps, the first window left out as warm-up). Peak resident memory
   is ``ru_maxrss`` of the run from ``os.wait4``: the largest of the trainer and its DataLoader workers (each its own
   peak); the peak of the summed proportional set size (PSS) of the trainer and its workers, sampled from ``/proc``
   every 0.5 s, is reported beside it.

Goals (issue 21), computed from the numbers, never typed: peak RSS of the cached run under 4 GB; cached images/s at
least 90% of the in-memory run's; nothing identifying in the cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

# The trainers inherit this (libgomp reads it at load): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]

from medpretrain.cli import UserError  # noqa: E402
from medpretrain.utils import code_version, cpu_model  # noqa: E402

DICOM_SIZE = 512
ID_MARKER, NAME_MARKER, FILE_MARKER = "MPXSCALEID", "MPXSCALENAME^", "mpxscalefile_"
"""Prefixes of every generated PatientID, PatientName and file name: long enough never to occur by chance."""
RSS_GOAL_BYTES = 4 * 2**30
RATE_GOAL = 0.9
START_LINE = re.compile(r"^\S[^:]*: (\d+) images \(")  # printed by the pretraining loop just before its first step
DEVICE = re.compile(r"process\(es\) on ([^\s,;]+)")


# --------------------------------------------------------------------------------------------
# Synthetic DICOM study
# --------------------------------------------------------------------------------------------


def radiograph(rng: np.random.Generator, size: int = DICOM_SIZE, lesion: bool = False) -> np.ndarray:
    """A chest-radiograph-like ``[size, size]`` uint16 image with 12-bit values (0..4095): body, lungs, spine, ribs,
    an exposure gradient and noise; ``lesion`` adds a bright nodule in one lung. Shapes vary per call."""
    t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = t[:, None], t[None, :]
    cx, cy = float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03))
    body = ((x - cx) / float(rng.uniform(0.75, 0.92))) ** 2 + ((y - cy) / float(rng.uniform(0.85, 0.98))) ** 2
    inside = body < 1.0
    img = np.where(inside, np.float32(0.55), np.float32(0.06)) + float(rng.uniform(-0.06, 0.06)) * (x + y)
    lungs = np.zeros((size, size), np.float32)
    centres = []
    for side in (-1.0, 1.0):
        lx, ly = cx + side * float(rng.uniform(0.27, 0.37)), cy - float(rng.uniform(0.0, 0.1))
        ax, ay = float(rng.uniform(0.18, 0.26)), float(rng.uniform(0.42, 0.58))
        lungs = np.maximum(lungs, np.sqrt(np.clip(1.0 - ((x - lx) / ax) ** 2 - ((y - ly) / ay) ** 2, 0.0, 1.0)))
        centres.append((lx, ly, ax, ay))
    ribs = (np.cos(y * float(rng.uniform(22, 30)) + float(rng.uniform(0, 6.3)) + 3.0 * np.abs(x - cx)) > 0.55)
    img = img - 0.32 * lungs + 0.07 * ribs * (lungs > 0) + 0.3 * np.exp(-(((x - cx) / 0.055) ** 2)) * inside
    if lesion:
        lx, ly, ax, ay = centres[int(rng.integers(2))]
        px, py = lx + float(rng.uniform(-0.5, 0.5)) * ax, ly + float(rng.uniform(-0.5, 0.5)) * ay
        r = float(rng.uniform(0.025, 0.07))
        img = img + 0.22 * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * r * r))
    img = img + rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.015)
    return np.rint(np.clip(img, 0.0, 1.0) * 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str, patient_name: str, study_uid: str) -> None:
    """One CR image as a DICOM Part 10 file (explicit VR little endian, 16 bits allocated, 12 stored)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)


def patients(n: int, seed: int) -> list[tuple[str, str]]:
    """Per file, its patient's (PatientID, PatientName): 1-3 consecutive files per patient, random identifiers."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    out: list[tuple[str, str]] = []
    while len(out) < n:
        pid = ID_MARKER + rng.bytes(6).hex().upper()
        name = NAME_MARKER + "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 8))
        out += [(pid, name)] * int(rng.integers(1, 4))
    return out[:n]


def file_rel(k: int) -> str:
    """The manifest path of file ``k`` (1 000 files per folder)."""
    return f"dicom/{k // 1000:03d}/{FILE_MARKER}{k:06d}.dcm"


def generate_files(folder: str, ks: list[int], who: list[tuple[str, str]], seed: int, size: int) -> list[dict[str, str]]:
    """Write files ``ks`` under ``folder``; their manifest rows. Each file's image is drawn from its own seed."""
    from pydicom.uid import generate_uid

    rows = []
    for k, (pid, name) in zip(ks, who, strict=True):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, k]))
        lesion = bool(rng.random() < 0.5)
        path = Path(folder) / file_rel(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One study per patient: its UID is derived from the patient, so the files of a patient share it.
        write_dicom(path, radiograph(rng, size, lesion), pid, name, generate_uid(entropy_srcs=[pid]))
        rows.append({"image_path": file_rel(k), "label": "abnormal" if lesion else "normal", "patient": pid})
    return rows


def generate(folder: Path, n: int, seed: int, workers: int, size: int = DICOM_SIZE) -> list[dict[str, str]]:
    """``n`` files under ``folder`` in ``workers`` processes (spawned: this process may hold torch's threads)."""
    who = patients(n, seed)
    parts = [list(range(i, min(i + 250, n))) for i in range(0, n, 250)]
    if workers <= 1:
        return [r for ks in parts for r in generate_files(str(folder), ks, [who[k] for k in ks], seed, size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(generate_files, str(folder), ks, [who[k] for k in ks], seed, size) for ks in parts]
        return [r for f in futures for r in f.result()]


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_path", "label", "patient"])
        w.writeheader()
        w.writerows(rows)
    return path


def identifiers_in(folder: Path, markers: list[str]) -> dict[str, list[str]]:
    """``{file relative to folder: markers found in its bytes}`` for every file under ``folder`` that holds one."""
    needles = [m.encode() for m in markers]
    overlap = max(len(b) for b in needles) - 1
    found: dict[str, list[str]] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        hits: set[str] = set()
        tail = b""
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                data = tail + block
                hits |= {m for m, b in zip(markers, needles, strict=True) if b in data}
                tail = data[-overlap:] if overlap else b""
        if hits:
            found[f.relative_to(folder).as_posix()] = sorted(hits)
    return found


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Pretraining runs: images/s from metrics.csv, memory from wait4 and /proc
# --------------------------------------------------------------------------------------------


def logged_rate(rows: list[dict[str, str]], batch: int) -> dict[str, Any]:
    """images/s of the windows after the first (warm-up): their images / their time, a window's time being its
    images over its logged ``images_per_s``. With one window it is kept (``warmup_excluded`` false)."""
    windows, prev = [], 0.0
    for row in rows:
        if not row.get("images_per_s") or not row.get("step"):
            continue
        step = float(row["step"])
        images = (step - prev) * batch
        windows.append((images, images / float(row["images_per_s"])))
        prev = step
    if not windows:
        raise ValueError("no images_per_s rows in metrics.csv")
    kept = windows[1:] if len(windows) > 1 else windows
    images, seconds = sum(w[0] for w in kept), sum(w[1] for w in kept)
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds, "windows": len(windows),
            "warmup_excluded": len(windows) > 1}


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (from ``/proc/<pid>/stat``'s parent field)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class MemorySampler:
    """Every ``interval`` s: the summed PSS of ``pid``'s process tree (its peak in ``peak_pss``, the most
    processes seen in ``processes``); nothing where ``/proc`` is missing."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak_pss, self.processes, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and Path("/proc/self").exists():
            pids = _tree(self.pid)
            self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            self.processes = max(self.processes, len(pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def show(cmd: list[str]) -> str:
    exe = Path(cmd[0]).absolute()
    head = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else cmd[0]
    return shlex.join([head, *(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:])])


def pretrain(name: str, overrides: list[str], run_dir: Path, batch: int, timeout_s: int) -> dict[str, Any]:
    """One ``pretrain/simclr.py`` run in its own process group: images/s, peak memory, times, its command."""
    cmd = [sys.executable, str(ROOT / "pretrain" / "simclr.py"), *overrides, f"out_dir={run_dir.parent}",
           f"run_name={run_dir.name}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = run_dir.parent / f"{name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    t_start, split_images = None, None
    with open(log, "w") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
        timer.start()
        with MemorySampler(proc.pid) as mem:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                start = START_LINE.search(line) if t_start is None else None
                if start:
                    t_start, split_images = time.monotonic(), int(start.group(1))
            _, status, usage = os.wait4(proc.pid, 0)  # the run's own rusage: ru_maxrss of it and its workers
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        timer.cancel()
        wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"{show(cmd)} failed with exit status {rc}:\n{''.join(lines)[-2000:]}"
                           f"{log.read_text()[-3000:]}")
    with open(run_dir / "metrics.csv", newline="") as fh:
        rate = logged_rate(list(csv.DictReader(fh)), batch)
    device = next((m.group(1) for m in map(DEVICE.search, lines) if m), None)
    return {**rate, "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_pss_bytes": mem.peak_pss or None,
            "processes": mem.processes, "pss_samples": mem.samples, "wall_s": wall,
            "startup_s": (t_start - t0) if t_start is not None else None, "cpu_s": usage.ru_utime + usage.ru_stime,
            "device": device, "split_images": split_images, "command": show(cmd)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import accelerate
    import pydicom
    import torch
    import torchvision

    # CUDA is asked in a child so that this process holds no GPU memory during the runs.
    probe = subprocess.run([sys.executable, "-c", "import torch; n = torch.cuda.device_count() if "
                            "torch.cuda.is_available() else 0; [print(torch.cuda.get_device_name(i)) for i in "
                            "range(n)]"], capture_output=True, text=True)
    gpus = [g for g in probe.stdout.splitlines() if g.strip()] if probe.returncode == 0 else []
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = None
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "memory_bytes": memory, "gpus": gpus,
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "pydicom": pydicom.__version__, "load_before": list(os.getloadavg())}


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals with their measured values and whether each is met."""
    runs = res["runs"]
    rss = runs["cache"]["peak_rss_bytes"]
    ratio = runs["cache"]["images_per_s"] / runs["memory"]["images_per_s"]
    leaks = len(res["privacy"]["files_with_identifiers"])
    return [
        {"goal": "peak resident memory of the cached training run", "target": "< 4 GiB",
         "value": f"{rss / 2**30:.2f} GiB", "met": rss < RSS_GOAL_BYTES},
        {"goal": "cached images/s against the in-memory run (same loader)", "target": f">= {RATE_GOAL:.0%}",
         "value": f"{ratio:.1%}", "met": ratio >= RATE_GOAL},
        {"goal": "files of the cache holding a patient name, ID, file name or the data path", "target": "0",
         "value": str(leaks), "met": leaks == 0},
    ]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    m, s, g, c, st = res["machine"], res["settings"], res["generated"], res["cache"], res["stream_index"]
    gpu = ", ".join(m["gpus"]) or "no GPU"
    lines = [
        "# Scale: 16-bit DICOM study, on-disk cache, streaming (issue 21)",
        "",
        f"Measured {res['date']} by `benchmarks/bench_scale.py` from code {res['code']} on {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs, {_gib(m['memory_bytes'])} GiB RAM, {gpu}), {m['platform']}, Python "
        f"{m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, accelerate {m['accelerate']}, pydicom "
        f"{m['pydicom']}, numpy {m['numpy']}. Load average before: {m['load_before']}.",
        "",
        f"Settings: {s['n']} generated files ({s['dicom_size']}x{s['dicom_size']}, 16 bits allocated, 12 stored), "
        f"subset {s['subset']}; SimCLR `{s['arch']}` at {s['image_size']} px, {s['steps']} steps of {s['batch']} "
        f"images, logged every {s['log_every']}, `split={s['split']}`, seed {s['seed']}; {s['workers']} worker "
        f"processes for generating, caching and `data.num_workers`.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        *[f"| {x['goal']} | {x['target']} | {x['value']} | {'yes' if x['met'] else '**no**'} |" for x in res["goals"]],
        "",
        "## Data",
        "",
        "| step | files | seconds | files/s | on disk |",
        "|---|---:|---:|---:|---:|",
        f"| generate DICOM ({s['workers']} processes) | {g['files']} | {g['seconds']:.1f} | "
        f"{g['files'] / g['seconds']:.0f} | {_gib(g['bytes'])} GiB |",
        f"| cache at {s['image_size']} px (`data.cache=on`, build only) | {c['files']} | {c['build_seconds']:.1f} | "
        f"{c['files_per_s']:.0f} | {_gib(c['bytes'])} GiB |",
        f"| cache, planning included | {c['files']} | {c['wall_seconds']:.1f} | "
        f"{c['files'] / c['wall_seconds']:.0f} | |",
        f"| stream index of the subset (`data.stream=on`) | {st['files']} | {st['wall_seconds']:.1f} | "
        f"{st['files'] / st['wall_seconds']:.0f} | {st['bytes'] / 1024:.1f} KiB |",
        "",
        f"The cache holds {c['samples']} images ({c['chunks']} chunks) in {c['dtype']}: "
        f"{c['bytes'] / max(c['samples'], 1) / 1024:.1f} KiB per image; the same images in float32 in memory would "
        f"take {_gib(c['float32_bytes'])} GiB.",
        "",
        "## Pretraining",
        "",
        "| run | images | images/s | vs memory | peak RSS GiB (largest process) | peak PSS GiB (trainer + workers) "
        "| start-up s | wall s | device |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    mem_rate = res["runs"]["memory"]["images_per_s"]
    for name, r in res["runs"].items():
        lines.append(f"| {RUN_TITLES[name]} | {r['split_images']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / mem_rate:.0%} | {_gib(r['peak_rss_bytes'])} | {_gib(r['peak_pss_bytes'])} | "
                     f"{_f(r['startup_s'])} | {r['wall_s']:.1f} | {r['device'] or '-'} |")
    lines += [
        "",
        "## How the numbers are made",
        "",
        "- Generation, caching and indexing run in the benchmark's process (their workers in child processes); "
        "each pretraining run is `pretrain/simclr.py` in its own process, started fresh (no shared page cache "
        "is dropped, so the cache files may be in the OS page cache from building them).",
        "- images/s: `metrics.csv` rows of the run, images of the windows after the first over their time (the "
        "first window, with allocator and worker start-up, is left out); images per step = the batch.",
        "- peak RSS: `ru_maxrss` from `os.wait4` of the run: the largest peak of the trainer or of one of its "
        "DataLoader workers (pages of the memory-mapped cache that were read count as resident). peak PSS: the "
        "largest sum of proportional set sizes over the trainer and its workers, sampled every 0.5 s "
        "(`/proc/<pid>/smaps_rollup`), shared pages counted once.",
        "- start-up: from starting the process to the line printed before the first step (imports, reading the "
        "manifest, decoding the set in memory or opening the cache / index, the model).",
        "- privacy: every file under the cache folder (the cache's pixels, thumbnails, index and metadata, and the "
        "stream index) is searched for the "
        f"prefixes `{ID_MARKER}`, `{NAME_MARKER}`, `{FILE_MARKER}` and the temporary folder's path.",
        f"- the temporary DICOM files, manifests, cache and runs were {'kept' if s['keep'] else 'deleted'} "
        "afterwards.",
        "",
        "## Commands",
        "",
        "```",
        res["command"],
        *[r["command"] for r in res["runs"].values()],
        "```",
        "",
        "(`<tmp>` is the temporary folder of the run.)",
    ]
    path.write_text("\n".join(lines) + "\n")


RUN_TITLES = {"cache": "cache (`data.cache=on`), full set", "memory": "memory, subset (same DataLoader)",
              "memory_on_device": "memory, subset, `train.cache_on_device=true`",
              "stream": "stream (`data.stream=on`), subset"}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="generated DICOM files (default 50000)")
    ap.add_argument("--subset", type=int, default=None, help="files of the in-memory and streamed runs (n // 10)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of each pretraining run")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--log-every", type=int, default=None, help="steps per metrics.csv row (steps // 5, >= 1)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--arch", default="resnet18", help="backbone.arch of the pretraining runs")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes for generating and caching, and data.num_workers (default min(8, CPUs))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the temporary study and cache go")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per pretraining run")
    ap.add_argument("--runs", default="cache,memory,memory_on_device,stream",
                    help="pretraining runs, comma-separated (cache and memory, the goal's pair, always)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files (their folder is printed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"),
                    help="writes <out>.json and <out>.md (default benchmarks/results/scale)")
    args = ap.parse_args(argv)
    args.subset = args.n // 10 if args.subset is None else args.subset
    args.log_every = args.log_every or max(1, args.steps // 5)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not {"cache", "memory"} <= set(args.runs) or not set(args.runs) <= set(RUN_TITLES):
        raise UserError(f"--runs must include cache and memory, from {', '.join(RUN_TITLES)}; got {args.runs}")
    if args.n < 2 or not 1 <= args.subset <= args.n or args.steps < 1 or args.batch < 2 or args.workers < 1:
        raise UserError(f"need n >= 2, 1 <= subset <= n, steps >= 1, batch >= 2, workers >= 1; got n={args.n}, "
                        f"subset={args.subset}, steps={args.steps}, batch={args.batch}, workers={args.workers}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from medpretrain.config import DataConfig
    from medpretrain.data.cache import build_cache
    from medpretrain.data.stream import build_stream_index

    need = args.n * (DICOM_SIZE**2 * 2 + 4096) + args.n * args.image_size**2 * 2 * 1.1
    free = shutil.disk_usage(args.tmp_dir).free
    if free < need:
        raise UserError(f"{args.tmp_dir}: {free / 2**30:.1f} GiB free, the study and its cache need about "
                        f"{need / 2**30:.1f} GiB (use --tmp-dir or a smaller --n)")
    tmp = Path(tempfile.mkdtemp(prefix="medpretrain-scale-", dir=args.tmp_dir))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "code": code_version(),
                           "machine": machine(), "command": show([sys.executable, __file__, *argv])}
    res["settings"] = {**{k: v for k, v in vars(args).items() if k not in ("out", "tmp_dir")},
                       "dicom_size": DICOM_SIZE, "split": "all", "manifest_columns": ["image_path", "label", "patient"]}
    try:
        print(f"generating {args.n} DICOM files under {tmp}")
        t0 = time.perf_counter()
        rows = generate(tmp, args.n, args.seed, args.workers)
        res["generated"] = {"files": len(rows), "seconds": time.perf_counter() - t0, "bytes": folder_bytes(tmp / "dicom"),
                            "patients": len({r["patient"] for r in rows}),
                            "abnormal": sum(r["label"] == "abnormal" for r in rows)}
        full, subset = write_manifest(tmp / "all.csv", rows), write_manifest(tmp / "subset.csv", rows[:args.subset])
        cache_dir = tmp / "cache"
        data = DataConfig(dataset=f"manifest:{full}", image_size=args.image_size, cache=True,
                          cache_dir=str(cache_dir), cache_workers=args.workers)
        print(f"caching at {args.image_size} px")
        t0 = time.perf_counter()
        info = build_cache(data)
        wall = time.perf_counter() - t0
        dtypes = {json.loads(f.read_text())["dtype"] for f in (info.folder / "chunks").glob("*.json")}
        res["cache"] = {"files": info.files, "samples": info.samples, "chunks": info.chunks,
                        "build_seconds": info.seconds, "wall_seconds": wall, "files_per_s": info.files / info.seconds,
                        "bytes": info.bytes, "dtype": "/".join(sorted(dtypes)),
                        "float32_bytes": info.samples * args.image_size**2 * 4}
        print(f"indexing {args.subset} files for streaming")
        t0 = time.perf_counter()
        index = build_stream_index(DataConfig(dataset=f"manifest:{subset}", image_size=args.image_size, stream=True,
                                              cache_dir=str(cache_dir), cache_workers=args.workers))
        res["stream_index"] = {"files": index.files, "wall_seconds": time.perf_counter() - t0, "bytes": index.bytes}
        # The cache and the stream index (both under cache_dir), before any training run adds to them.
        markers = [ID_MARKER, NAME_MARKER, FILE_MARKER, str(tmp)]
        res["privacy"] = {"markers": [ID_MARKER, NAME_MARKER, FILE_MARKER, "<tmp>"],
                          "files_searched": sum(1 for p in cache_dir.rglob("*") if p.is_file()),
                          "files_with_identifiers": identifiers_in(cache_dir, markers)}
        common = [f"data.image_size={args.image_size}", f"data.num_workers={args.workers}", f"backbone.arch={args.arch}",
                  "split=all", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                  f"train.log_every={args.log_every}", "train.knn_every=-1", "train.checkpoint_every=0",
                  f"train.seed={args.seed}", f"data.cache_dir={cache_dir}", f"data.cache_workers={args.workers}"]
        plans = {
            "cache": [f"data.dataset=manifest:{full}", "data.cache=on", "train.cache_on_device=false"],
            "memory": [f"data.dataset=manifest:{subset}", "train.cache_on_device=false"],
            "memory_on_device": [f"data.dataset=manifest:{subset}", "train.cache_on_device=true"],
            "stream": [f"data.dataset=manifest:{subset}", "data.stream=on", "train.cache_on_device=false"],
        }
        res["runs"] = {}
        for name, extra in ((k, v) for k, v in plans.items() if k in args.runs):
            print(f"pretraining: {RUN_TITLES[name]}")
            r = pretrain(name, [*common, *extra], tmp / "runs" / name, args.batch, args.timeout)
            r["command"] = r["command"].replace(str(tmp), "<tmp>")
            res["runs"][name] = r
            print(f"  {r['images_per_s']:.1f} images/s, peak RSS {_gib(r['peak_rss_bytes'])} GiB")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["settings"]["keep"] = args.keep
    res["goals"] = goals(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), res)
    for x in res["goals"]:
        print(f"{x['goal']}: {x['value']} (target {x['target']}): {'met' if x['met'] else 'NOT met'}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
