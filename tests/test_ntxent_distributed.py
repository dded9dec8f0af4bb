"""NT-Xent with negatives gathered across two real processes equals the single-process loss on the full
batch, in value and in gradients (``torchrun --nproc_per_node 2``, gloo on the CPU, accelerate MULTI_CPU).

The reference is lightly's ``NTXentLoss`` on one process over the whole batch, and a naive loop over
SimCLR's Algorithm 1. The same check on an ``accelerator.gather`` version (no gradient through the
gathered negatives) must fail: that is why the scripts use ``gather_distributed=True``.

The project's own step is checked the same way: the SimCLR method of :mod:`medpretrain.methods` (backbone,
projection head and its NT-Xent, as :func:`medpretrain.pretrain.main` builds it) on each process's half
batch, prepared by accelerate (DDP), gives after DDP's all-reduce the parameter gradients of the whole batch
on one process (:func:`test_project_simclr_step_gradients_equal_single_process_full_batch`). Mutations
applied by hand to ``medpretrain/methods/simclr.py`` on a scratch copy (``PYTHONPATH`` first), each making
that test fail:

* ``NTXentLoss(..., gather_distributed=False)``: per-process losses 1.94 against 2.70 on the full batch
  (the loss assertion fails), and the largest parameter-gradient difference is 0.12 of the largest gradient
  (the gradient assertion allows 1e-4; the gathering step measures 1.4e-6);
* the gathered negatives without gradient (the criterion on ``accelerator.gather``; kept in the suite by
  :func:`test_project_simclr_step_without_gradient_through_the_gather_is_wrong`): the same loss, but
  gradients off by 0.65 of the largest one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

ROOT = Path(__file__).resolve().parents[1]
BATCH, DIM, TEMP = 8, 5, 0.3


def naive_ntxent(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR Algorithm 1 as a loop: l(i, j) over all 2N anchors, mean."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    sim = z @ z.T / t
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = torch.logsumexp(torch.cat([sim[i, :i], sim[i, i + 1 :]]), 0)
        total = total + (denom - sim[i, j])
    return total / (2 * n)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
           "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "dist_ntxent_worker.py"),
           str(out), str(BATCH), str(DIM), str(TEMP)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def full_batch():
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(1234)
        z0 = torch.randn(BATCH, DIM, generator=g)
        z1 = torch.randn(BATCH, DIM, generator=g)
    finally:
        torch.set_default_dtype(torch.float32)
    return z0, z1


def test_two_real_processes_under_accelerate(results):
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    assert all("MULTI_CPU" in r["distributed_type"] for r in results)


def test_loss_equals_single_process_full_batch(results):
    z0, z1 = full_batch()
    full = NTXentLoss(temperature=TEMP)(z0, z1)
    torch.testing.assert_close(full, naive_ntxent(z0, z1, TEMP), atol=1e-10, rtol=0)
    dist_mean = torch.stack([r["loss"] for r in results]).mean()
    assert abs(dist_mean.item() - full.item()) < 1e-5
    # each half alone (no gathering) is a different, easier problem
    local = NTXentLoss(temperature=TEMP)(z0[: BATCH // 2], z1[: BATCH // 2])
    assert abs(local.item() - full.item()) > 1e-2


def test_gradients_equal_single_process_full_batch(results):
    z0, z1 = full_batch()
    z0.requires_grad_(True)
    z1.requires_grad_(True)
    NTXentLoss(temperature=TEMP)(z0, z1).backward()
    half, world = BATCH // 2, 2
    got0 = torch.cat([r["grad0"] for r in results]) / world  # GatherLayer sums over processes; DDP averages
    got1 = torch.cat([r["grad1"] for r in results]) / world
    assert (got0 - z0.grad).abs().max().item() < 1e-5
    assert (got1 - z1.grad).abs().max().item() < 1e-5
    assert results[0]["grad0"].shape == (half, DIM)


def test_ddp_parameter_gradients_equal_single_process(results):
    z0, z1 = full_batch()
    from dist_ntxent_worker import linear

    model = linear(DIM)
    out0, out1 = model(torch.cat([z0, z1])).chunk(2)
    NTXentLoss(temperature=TEMP)(out0, out1).backward()
    for r in results:  # after DDP's all-reduce every process holds the same, full-batch gradient
        assert (r["weight_grad"] - model.weight.grad).abs().max().item() < 1e-5
        assert (r["bias_grad"] - model.bias.grad).abs().max().item() < 1e-5
    loss = NTXentLoss(temperature=TEMP)(out0, out1).item()
    assert abs(torch.stack([r["model_loss"] for r in results]).mean().item() - loss) < 1e-5


def test_accelerate_gather_without_gradient_is_wrong(results):
    """Same loss value, wrong gradients: the reason for lightly's gradient-carrying gather."""
    z0, z1 = full_batch()
    z0.requires_grad_(True)
    z1.requires_grad_(True)
    full = NTXentLoss(temperature=TEMP)(z0, z1)
    full.backward()
    assert abs(torch.stack([r["bad_loss"] for r in results]).mean().item() - full.item()) < 1e-5
    got = torch.cat([r["bad_grad0"] for r in results]) / 2
    assert (got - z0.grad).abs().max().item() > 1e-3


def test_project_simclr_step_gradients_equal_single_process_full_batch(results):
    """The project's SimCLR module and loss, half a batch per process: every parameter gradient after DDP's
    all-reduce equals the single-process gradient on the full batch (the gather carries gradients)."""
    from dist_ntxent_worker import simclr_model, simclr_views

    model = simclr_model()
    x0, x1 = simclr_views()
    loss = model(x0, x1)
    loss.backward()
    ref = {k: p.grad for k, p in model.named_parameters()}
    assert len(ref) > 10 and all(g is not None for g in ref.values())
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 1e-3  # a real gradient, not a vanishing one
    for r in results:
        got = r["simclr"]
        assert abs(torch.stack([x["simclr"]["loss"] for x in results]).mean().item() - loss.item()) < 1e-5
        assert {k[len("grad."):] for k in got if k.startswith("grad.")} == set(ref)
        worst = max((got[f"grad.{k}"] - g).abs().max().item() for k, g in ref.items())
        assert worst < 1e-4 * scale, (worst, scale)
    # the processes hold the same (all-reduced) gradients
    assert all(torch.equal(results[0]["simclr"][k], results[1]["simclr"][k]) for k in results[0]["simclr"]
               if k.startswith("grad."))


def test_project_simclr_step_without_gradient_through_the_gather_is_wrong(results):
    """The same step with the gathered copies detached: the loss is the same, the gradients are not."""
    from dist_ntxent_worker import simclr_model, simclr_views

    model = simclr_model()
    x0, x1 = simclr_views()
    loss = model(x0, x1)
    loss.backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    bad = results[0]["simclr_no_grad_gather"]
    assert abs(torch.stack([x["simclr_no_grad_gather"]["loss"] for x in results]).mean().item() - loss.item()) < 1e-5
    worst = max((bad[f"grad.{k}"] - p.grad).abs().max().item() for k, p in model.named_parameters())
    assert worst > 0.05 * scale, (worst, scale)
