"""Worker for tests/test_ntxent_distributed.py, launched with ``torchrun --nproc_per_node 2``.

Each process takes its half of a fixed batch of projections, computes lightly's NT-Xent with negatives
gathered across processes (``gather_distributed=True``), backpropagates, and writes its loss and the
gradient of its half to ``$OUT/rank<r>.pt``. Initialisation goes through accelerate (MULTI_CPU, gloo), as
in the training scripts. A second pass with ``accelerator.gather`` (no gradient) is written too, to show
why it must not be used.

Then the project's own step: the SimCLR method of :mod:`medpretrain.methods` (cbr_tiny backbone, lightly's
projection head, its ``NTXentLoss(gather_distributed=True)``), built and prepared as
:func:`medpretrain.pretrain.main` builds it, takes this process's half of a fixed batch of two views through
the DDP wrapper's forward; the parameter gradients after DDP's all-reduce are written, and those of the same
step with the criterion's gathered copies detached (``accelerator.gather``, no gradient).
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


SIMCLR_BATCH, SIMCLR_SIZE = 8, 16


def simclr_model() -> torch.nn.Module:
    """The project's SimCLR method (cbr_tiny, 1 channel) with fixed weights, in eval mode.

    Eval mode: BatchNorm then normalises with its running statistics, the same for every sample, so a
    half batch per process is the same computation as the full batch on one process except for the
    negatives, which is what the gather must restore (in train mode each process's BatchNorm sees its own
    half: per-process statistics, a separate and documented departure, see ``moco.split_bn``).
    """
    from medpretrain.backbones import build_backbone
    from medpretrain.methods.simclr import SimCLR, SimCLRMethodConfig

    torch.manual_seed(0)
    model = SimCLR(build_backbone("cbr_tiny", 1, "small", image_size=SIMCLR_SIZE),
                   SimCLRMethodConfig(hidden_dim=32, output_dim=16, temperature=0.5), processes=2)
    return model.eval()


def simclr_views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed float32 "views" ``[SIMCLR_BATCH, 1, SIMCLR_SIZE, SIMCLR_SIZE]`` (the second a perturbed first)."""
    g = torch.Generator().manual_seed(99)
    x0 = torch.rand(SIMCLR_BATCH, 1, SIMCLR_SIZE, SIMCLR_SIZE, generator=g, dtype=torch.float32)
    x1 = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float32)
    return x0, x1


class _NoGradGatherNTXent(torch.nn.Module):
    """NT-Xent on ``accelerator.gather``ed copies (no gradient to the other process's rows)."""

    def __init__(self, accelerator: Accelerator, temperature: float):
        super().__init__()
        self.accelerator, self.temperature = accelerator, temperature

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        return local_gather_loss(z0, z1, self.accelerator, self.temperature)


def simclr_step(accelerator: Accelerator, no_grad_gather: bool = False) -> dict[str, torch.Tensor]:
    """One SimCLR forward/backward on this process's half batch, through DDP; loss and parameter gradients."""
    model = simclr_model()  # the criterion exactly as the method builds it
    if no_grad_gather:
        model.criterion = _NoGradGatherNTXent(accelerator, 0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    x0, x1 = simclr_views()
    half = SIMCLR_BATCH // accelerator.num_processes
    sl = slice(accelerator.process_index * half, (accelerator.process_index + 1) * half)
    loss = ddp(x0[sl], x1[sl])  # the loop's call: the whole step through the DDP wrapper's forward
    accelerator.backward(loss)
    inner = accelerator.unwrap_model(ddp)
    return {"loss": loss.detach(), **{f"grad.{k}": p.grad.clone() for k, p in inner.named_parameters()}}


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
    torch.set_default_dtype(torch.float32)
    simclr = simclr_step(accelerator)
    simclr_bad = simclr_step(accelerator, no_grad_gather=True)
    torch.save(
        {"model_loss": model_loss.detach(), "weight_grad": inner.weight.grad, "bias_grad": inner.bias.grad,
         "loss": loss.detach(), "grad0": z0.grad, "grad1": z1.grad, "rank": accelerator.process_index,
         "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
         "bad_loss": bad.detach(), "bad_grad0": y0.grad, "simclr": simclr, "simclr_no_grad_gather": simclr_bad},
        os.path.join(out, f"rank{accelerator.process_index}.pt"),
    )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
