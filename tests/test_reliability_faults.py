"""Reliability: a process killed while writing a checkpoint resumes from the previous complete one.

``MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT=k`` hard-exits (``os._exit(137)``, no cleanup, like SIGKILL) after
accelerate wrote the state files of the step-``k`` checkpoint but before its ``COMPLETE`` marker. The
resumed run must ignore that folder, continue from step ``k - checkpoint_every``, finish with the same
number of steps and, on the CPU where SimCLR is deterministic, end with the uninterrupted run's weights
and logged losses, bit for bit (``torch.equal``).
The same holds for fine-tuning (killed between epochs) and for DCGAN (a generative run, whose checkpoint
also carries the mode-collapse monitor).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_record import record

from medpretrain.checkpoint import load_backbone_state, read_meta
from medpretrain.resume import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=6", "train.log_every=1",
        "train.checkpoint_every=2", "train.knn_every=-1", "data.image_size=28"]


def simclr(args: list[str], data_root: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "pretrain" / "simclr.py"), *ARGS, *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def steps(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r["loss"] != ""]


def loss_rows(path: Path) -> list[tuple[str, str]]:
    """``(step, loss)`` of every loss row, as written."""
    with open(path, newline="") as fh:
        return [(r["step"], r["loss"]) for r in csv.DictReader(fh) if r["loss"] != ""]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_previous(data_root, tmp_path):
    ref = simclr([f"out_dir={tmp_path}", "run_name=ref"], data_root)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = simclr([f"out_dir={tmp_path}", "run_name=r"], data_root, {"MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT": "4"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    run = tmp_path / "r"
    ckpts = {p.name: (p / COMPLETE_MARKER).exists() for p in (run / "checkpoints").iterdir()}
    assert ckpts == {"checkpoint_0": True, "checkpoint_1": False}  # step 2 complete, step 4 cut before its marker
    assert any((run / "checkpoints" / "checkpoint_1").iterdir())  # the state files were written
    assert not (run / "backbone.safetensors").exists()

    resumed = simclr([f"out_dir={tmp_path}", "train.resume=auto"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2/6" in resumed.stdout, resumed.stdout[-2000:]
    assert steps(run / "metrics.csv") == [1, 2, 3, 4, 5, 6]
    assert read_meta(run / "backbone.safetensors").steps == 6
    (a, _), (b, _) = load_backbone_state(run / "backbone.safetensors"), load_backbone_state(
        tmp_path / "ref" / "backbone.safetensors")
    diff = max_difference(a, b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], diff  # bit-identical weights and buffers
    assert loss_rows(run / "metrics.csv") == loss_rows(tmp_path / "ref" / "metrics.csv")
    record("fault injected", "SIGKILL-like exit inside the step-4 checkpoint write (SimCLR)",
           f"resumed from step 2, 6/6 steps, max weight difference to the uninterrupted run {diff:.1e}")


FT = [str(ROOT / "finetune" / "run.py"), "--config", str(ROOT / "configs" / "finetune.yaml"),
      "backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=3", "optim.max_steps_per_epoch=2", "optim.batch_size=32",
      "optim.eval_batch_size=512", "n_bootstrap=20", "data.label_fraction=0.05", "init=scratch", "regime=full"]


def finetune(out: Path, data_root: Path, env_extra: dict[str, str] | None = None,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *FT, f"output_dir={out}", *extra], capture_output=True, text=True,
                          timeout=300, env=env, cwd=out.parent)


@pytest.mark.slow
def test_finetune_killed_between_epochs_in_checkpoint_write_resumes_exactly(data_root, tmp_path):
    from medpretrain.checkpoint import load_state_dict

    ref = finetune(tmp_path / "ref", data_root)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "r"
    killed = finetune(out, data_root, {"MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT": "2"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert not (out / "results.json").exists()
    resumed = finetune(out, data_root, extra=("resume=auto",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1" in resumed.stdout + resumed.stderr
    (a, _), (b, _) = load_state_dict(out / "model.safetensors"), load_state_dict(tmp_path / "ref" / "model.safetensors")
    diff = max_difference(a, b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], diff  # bit-identical

    def logged(path: Path) -> list[dict[str, str]]:  # every column as written but the wall time
        with open(path, newline="") as fh:
            return [{k: v for k, v in r.items() if k != "epoch_s"} for r in csv.DictReader(fh)]

    assert logged(out / "metrics.csv") == logged(tmp_path / "ref" / "metrics.csv")
    record("fault injected", "exit inside the epoch-2 checkpoint write of fine-tuning (between epochs)",
           f"resumed after epoch 1, 3/3 epochs, max weight difference to the uninterrupted run {diff:.1e}")


GAN = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=6", "train.log_every=1",
       "train.checkpoint_every=2", "train.grid_size=16", "train.log_with=none", "collapse_check_every=1",
       "on_collapse=warn"]


def dcgan(args: list[str], data_root: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "generative" / "dcgan.py"), *GAN, *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_dcgan_killed_during_checkpoint_write_resumes_from_previous(data_root, tmp_path):
    """The generative variant: DCGAN's checkpoint also carries the mode-collapse monitor (checked every step
    here), so the resumed run must log the same diversity ratios as the uninterrupted one."""
    from medpretrain.checkpoint import load_state_dict

    ref = dcgan([f"out_dir={tmp_path}", "run_name=ref"], data_root)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = dcgan([f"out_dir={tmp_path}", "run_name=r"], data_root, {"MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT": "4"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    run = tmp_path / "r"
    ckpts = {p.name: (p / COMPLETE_MARKER).exists() for p in (run / "checkpoints").iterdir()}
    assert ckpts == {"checkpoint_0": True, "checkpoint_1": False}  # step 2 complete, step 4 cut before its marker
    assert any((run / "checkpoints" / "checkpoint_1").iterdir())
    assert not (run / "generator.safetensors").exists()

    resumed = dcgan([f"out_dir={tmp_path}", "run_name=r", "train.resume=auto"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout, resumed.stdout[-2000:]

    def rows(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as fh:
            return [{k: r[k] for k in ("step", "d_loss", "g_loss", "diversity_ratio")} for r in csv.DictReader(fh)]

    assert [int(r["step"]) for r in rows(run / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert rows(run / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")
    assert read_meta(run / "backbone.safetensors").steps == 6
    (a, meta), (b, _) = load_state_dict(run / "generator.safetensors"), load_state_dict(tmp_path / "ref" /
                                                                                       "generator.safetensors")
    assert meta["steps"] == 6
    diff = max_difference(a, b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], diff  # bit-identical generator
    (da, _), (db, _) = load_backbone_state(run / "backbone.safetensors"), load_backbone_state(
        tmp_path / "ref" / "backbone.safetensors")
    assert [k for k in da if not torch.equal(da[k], db[k])] == []  # and discriminator trunk
    record("fault injected", "exit inside the step-4 checkpoint write (DCGAN, collapse monitor every step)",
           f"resumed from step 2, 6/6 steps, same losses and diversity ratios, max generator weight difference "
           f"to the uninterrupted run {diff:.1e}")
