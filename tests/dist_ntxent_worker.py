"""Worker for tests/test_ntxent_distributed.py, launched with ``torchrun --nproc_per_node 2``.

Each process takes its half of a fixed batch of projections, computes lightly's NT-Xent with negatives
gathered across processes (``gather_distributed=True``), backpropagates, and writes its loss and the
gradient of its half to ``$OUT/rank<r>.pt``. Initialisation goes through accelerate (MULTI_CPU, gloo), as
in the training scripts. A second pass with ``accelerator.gather`` (no gradient) is written too, to show
why it must not be used.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from lightly.loss import NTXentLoss


def local_gather_loss(z0: torch.Tensor, z1: torch.Tensor, accelerator: Accelerator, t: float) -> torch.Tensor:
    """NT-Xent built on ``accelerator.gather``: the gathered copies carry no gradient."""
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    g0, g1 = accelerator.gather(z0), accelerator.gather(z1)
    n, r = z0.shape[0], accelerator.process_index
    # splice the local (gradient-carrying) rows back in, as a naive user might
    g0 = torch.cat([g0[: r * n], z0, g0[(r + 1) * n :]])
    g1 = torch.cat([g1[: r * n], z1, g1[(r + 1) * n :]])
    mask = torch.zeros(n, g0.shape[0], dtype=torch.bool)
    mask[torch.arange(n), torch.arange(n) + r * n] = True
    l01, l00 = z0 @ g1.T / t, (z0 @ g0.T / t)[~mask].view(n, -1)
    l10, l11 = z1 @ g0.T / t, (z1 @ g1.T / t)[~mask].view(n, -1)
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)])
    labels = (torch.arange(n) + r * n).repeat(2)
    return F.cross_entropy(logits, labels)


def linear(dim: int) -> torch.nn.Linear:
    """A fixed linear layer (same weights in the worker and in the test, whatever the RNG)."""
    layer = torch.nn.Linear(dim, dim).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 1, dim * dim, dtype=torch.float64).view(dim, dim).sin())
        layer.bias.copy_(torch.linspace(-0.5, 0.5, dim, dtype=torch.float64))
    return layer


def main() -> None:
    out = sys.argv[1]
    batch, dim, temperature = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(1234)
    z0_all = torch.randn(batch, dim, generator=g)
    z1_all = torch.randn(batch, dim, generator=g)
    half = batch // accelerator.num_processes
    sl = slice(accelerator.process_index * half, (accelerator.process_index + 1) * half)

    z0 = z0_all[sl].clone().requires_grad_(True)
    z1 = z1_all[sl].clone().requires_grad_(True)
    loss = NTXentLoss(temperature=temperature, gather_distributed=True)(z0, z1)
    # DDP averages gradients over processes; the per-process loss is the mean over its own rows, so the
    # sum of the per-process gradients equals the gradient of the mean loss over the full batch times 2.
    loss.backward()

    y0 = z0_all[sl].clone().requires_grad_(True)
    y1 = z1_all[sl].clone().requires_grad_(True)
    bad = local_gather_loss(y0, y1, accelerator, temperature)
    bad.backward()
    # End to end through DDP: a linear "model" prepared by accelerate; DDP averages parameter gradients,
    # which with gathered negatives must equal the single-process gradient on the full batch.
    model = linear(dim)
    model = accelerator.prepare(model)
    x0, x1 = z0_all[sl], z1_all[sl]
    out0, out1 = model(torch.cat([x0, x1])).chunk(2)
    model_loss = NTXentLoss(temperature=temperature, gather_distributed=True)(out0, out1)
    accelerator.backward(model_loss)
    inner = accelerator.unwrap_model(model)
    torch.save(
        {"model_loss": model_loss.detach(), "weight_grad": inner.weight.grad, "bias_grad": inner.bias.grad,
         "loss": loss.detach(), "grad0": z0.grad, "grad1": z1.grad, "rank": accelerator.process_index,
         "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
         "bad_loss": bad.detach(), "bad_grad0": y0.grad},
        os.path.join(out, f"rank{accelerator.process_index}.pt"),
    )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
