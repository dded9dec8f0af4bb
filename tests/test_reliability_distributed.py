"""Reliability: one of two processes dying makes the launch exit non-zero with a clear error, not hang.

A tiny gloo worker (``tests/dist_fault_worker.py``) and the real ``pretrain/simclr.py`` under
``torchrun --nproc_per_node 2``, where rank 1 hard-exits mid-run and rank 0 waits in a collective.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_record import record

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60


def torchrun(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    exe = ROOT / ".venv" / "bin" / "torchrun"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    t0 = time.monotonic()
    # The timeout is the test's failure mode: a hang raises TimeoutExpired instead of blocking the suite.
    proc = subprocess.run([*head, "--standalone", "--nproc_per_node", "2", "--monitor-interval", "0.5", *args],
                          capture_output=True, text=True, timeout=DEADLINE_S, env=env, cwd=ROOT)
    return proc, time.monotonic() - t0


def test_rank_death_ends_the_launch_with_an_error():
    proc, seconds = torchrun([str(ROOT / "tests" / "dist_fault_worker.py"), "3"])
    assert proc.returncode != 0
    assert "ChildFailedError" in proc.stderr and "rank      : 1" in proc.stderr
    assert "exitcode  : 1" in proc.stderr, proc.stderr[-3000:]
    record("distributed fault", "torchrun 2 x gloo worker, rank 1 os._exit(1) at step 3",
           f"launcher exit {proc.returncode} after {seconds:.1f} s, ChildFailedError names rank 1")


@pytest.mark.slow
def test_rank_death_during_simclr_pretraining(data_root, tmp_path):
    proc, seconds = torchrun(
        [str(ROOT / "pretrain" / "simclr.py"), "backbone.arch=cbr_tiny", "train.batch_size=16",
         "train.max_steps=6", "train.log_every=1", "train.checkpoint_every=1", "train.knn_every=-1",
         f"out_dir={tmp_path}", "run_name=ddp"],
        {"MEDPRETRAIN_DATA": str(data_root), "MEDPRETRAIN_FAULT_EXIT_AT_STEP": "2", "MEDPRETRAIN_FAULT_RANK": "1"})
    assert proc.returncode != 0
    assert "ChildFailedError" in proc.stderr and "exitcode  : 137" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ddp" / "backbone.safetensors").exists()  # no export from a broken run
    record("distributed fault", "torchrun 2 x pretrain/simclr.py, rank 1 killed after step 2",
           f"launcher exit {proc.returncode} after {seconds:.1f} s, ChildFailedError names the exit code")
