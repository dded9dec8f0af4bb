"""End to end: ``accelerate launch pretrain/{simclr,moco}.py`` on real PneumoniaMNIST for a few steps.

Checks the exported contract backbone (loads exactly, feeds a classifier), the metrics CSV, plots and
TensorBoard logs; a kill mid-run followed by ``train.resume=auto`` (same steps, no CSV gap, same losses
as an uninterrupted run, a half-written checkpoint ignored); and the NaN guard.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# tiny but real: cbr_tiny, 28 px, batch 16
COMMON = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=6", "train.log_every=1",
          "train.checkpoint_every=2", "train.knn_every=-1"]


def launch(script: str, args: list[str], data_root: Path, env_extra: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(ROOT / "pretrain" / script), *args]
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def loss_rows(path: Path) -> dict[int, float]:
    rows = [r for r in read_csv(path) if r["loss"] != ""]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in {path}: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def logged_losses(path: Path) -> list[tuple[str, str, str]]:
    """``(step, loss, lr)`` of every loss row, as written."""
    return [(r["step"], r["loss"], r["lr"]) for r in read_csv(path) if r["loss"] != ""]


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("simclr")
    proc = launch("simclr.py", [*COMMON, "train.knn_every=0", f"out_dir={out}", "run_name=ref"], data_root)
    run = out / "ref"
    assert f"backbone: {run / 'backbone.safetensors'}" in proc.stdout
    return run


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("moco")
    launch("moco.py", [*COMMON, "train.knn_every=0", "moco.queue_size=64", f"out_dir={out}", "run_name=ref"],
           data_root)
    return out / "ref"


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_export_loads_into_classifier(method, simclr_run, moco_run):
    from medpretrain.checkpoint import load_backbone, read_meta

    run = simclr_run if method == "simclr" else moco_run
    for name in ("backbone.safetensors", "config.yaml", "metrics.csv", "loss.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    meta = read_meta(run / "backbone.safetensors")
    assert meta.method == method and meta.steps == 6 and meta.epochs == 1
    assert meta.dataset == "medmnist:pneumoniamnist" and len(meta.dataset_hash) >= 8
    assert (meta.mean, meta.std, meta.image_size, meta.in_channels) == (0.5, 0.5, 28, 1)
    assert meta.config["train"]["max_steps"] == 6 and meta.config["backbone"]["arch"] == "cbr_tiny"
    # the final kNN on the labelled val split: the value logged last, above the majority class (0.742)
    knn_logged = [float(r["knn_acc"]) for r in read_csv(run / "metrics.csv") if r["knn_acc"] != ""]
    assert meta.extra["knn_acc"] == pytest.approx(knn_logged[-1], abs=1e-6)
    val = build_dataset(DataConfig(dataset="medmnist:pneumoniamnist"), "val")
    majority = np.bincount(val.labels).max() / len(val)
    assert meta.extra["knn_acc"] > majority + 0.05, (meta.extra["knn_acc"], majority)

    backbone, _ = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    classifier = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 2)).eval()
    logits = classifier(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()

    losses = loss_rows(run / "metrics.csv")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    knn = [float(r["knn_acc"]) for r in read_csv(run / "metrics.csv") if r["knn_acc"] != ""]
    assert len(knn) == 2  # before training and at the end
    # trained weights differ from a fresh init
    from medpretrain.backbones import build_backbone

    torch.manual_seed(0)
    fresh = build_backbone("cbr_tiny", 1, "small")
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), backbone.state_dict().values(),
                                                       strict=True))


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_kill_and_resume_matches_uninterrupted_run(method, simclr_run, moco_run, data_root, tmp_path):
    ref = simclr_run if method == "simclr" else moco_run
    script = f"{method}.py"
    extra = ["moco.queue_size=64"] if method == "moco" else []
    args = [*COMMON, *extra, f"out_dir={tmp_path}"]
    # Hard exit (no cleanup, like SIGKILL) right after step 5: checkpoints exist for steps 2 and 4.
    proc = launch(script, [*args, "run_name=r"], data_root, {"MEDPRETRAIN_FAULT_EXIT_AT_STEP": "5"}, check=False)
    assert proc.returncode != 0
    run = tmp_path / "r"
    assert not (run / "backbone.safetensors").exists()
    assert sorted(loss_rows(run / "metrics.csv")) == [1, 2, 3, 4, 5]
    done = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert done == ["checkpoint_0", "checkpoint_1"]  # total_limit=2
    # A checkpoint killed mid-write: a folder without the COMPLETE marker must be ignored.
    broken = run / "checkpoints" / "checkpoint_2"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")

    proc = launch(script, [*args, "train.resume=auto"], data_root)  # no run_name: finds the interrupted run
    assert "at step 4/6" in proc.stdout
    assert (run / "backbone.safetensors").is_file()
    resumed = loss_rows(run / "metrics.csv")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # step 5 re-done once, no gap, no duplicate
    # Exact on the CPU: the same losses as written (every digit) and bit-identical weights and buffers.
    assert logged_losses(run / "metrics.csv") == logged_losses(ref / "metrics.csv")
    from medpretrain.checkpoint import load_backbone_state, read_meta

    assert read_meta(run / "backbone.safetensors").steps == 6
    (a, _), (b, _) = load_backbone_state(run / "backbone.safetensors"), load_backbone_state(ref / "backbone.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_nan_loss_stops_with_step_and_last_checkpoint(data_root, tmp_path):
    proc = launch("simclr.py", [*COMMON, "train.log_every=2", f"out_dir={tmp_path}", "run_name=nan"], data_root,
                  {"MEDPRETRAIN_FAULT_NAN_AT_STEP": "3"}, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "loss is not finite (NaN or inf) at step 3" in text
    assert str(tmp_path / "nan" / "checkpoints" / "checkpoint_0") in text  # the step-2 checkpoint
    assert not (tmp_path / "nan" / "backbone.safetensors").exists()
    # no checkpoint was written after the bad step
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["checkpoint_0"]


def test_bad_config_fails_before_work(data_root, tmp_path):
    proc = launch("moco.py", ["train.lr=fast", f"out_dir={tmp_path}"], data_root, check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr
    proc = launch("simclr.py", ["split=test", f"out_dir={tmp_path}"], data_root, check=False)
    assert proc.returncode != 0 and "never test" in proc.stderr


def test_selfsup_init_finds_the_newest_export(simclr_run, moco_run, tmp_path):
    """``finetune/run.py --init selfsup`` resolves to the newest simclr/moco export (by meta.created)."""
    import shutil

    from medpretrain.checkpoint import read_meta
    from medpretrain.init import init_backbone

    runs = tmp_path / "runs"
    for run, method in ((simclr_run, "simclr"), (moco_run, "moco")):
        dst = runs / "pretrain" / method / "r1" / "backbone.safetensors"
        dst.parent.mkdir(parents=True)
        shutil.copy(run / "backbone.safetensors", dst)
    newest = max(("simclr", "moco"), key=lambda m: read_meta(runs / "pretrain" / m / "r1" / "backbone.safetensors").created)
    backbone, info = init_backbone("selfsup", "cbr_tiny", 1, "small", image_size=28, runs_dir=runs)
    assert info.name == newest and info.source.endswith(f"pretrain/{newest}/r1/backbone.safetensors")
    # an explicit path always wins
    other = "moco" if newest == "simclr" else "simclr"
    explicit = runs / "pretrain" / other / "r1" / "backbone.safetensors"
    backbone, info = init_backbone(str(explicit), "cbr_tiny", 1, "small", image_size=28, runs_dir=runs)
    assert info.name == other and info.source.endswith(f"pretrain/{other}/r1/backbone.safetensors")


def test_two_processes_with_torchrun(data_root, tmp_path):
    """Real 2-process SimCLR (gloo): one process group, negatives from the global batch, one CSV writer."""
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "pretrain" / "simclr.py"),
           "backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=2", "train.log_every=1",
           "train.checkpoint_every=1", "train.knn_every=-1", f"out_dir={tmp_path}", "run_name=ddp"]
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "global batch 32, 2 steps, 2 process(es)" in proc.stdout
    losses = loss_rows(tmp_path / "ddp" / "metrics.csv")
    assert sorted(losses) == [1, 2]
    # NT-Xent at initialisation is about log(2N - 1) with N the batch the negatives come from:
    # gathered over both processes (N = 32, log 63 = 4.14), not per process (N = 16, log 31 = 3.43).
    assert abs(losses[1] - math.log(63)) < 0.3
    assert (tmp_path / "ddp" / "backbone.safetensors").is_file()
    ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint_0"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
