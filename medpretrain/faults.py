"""Failure handling of training loops: the non-finite loss guard and the test-only fault hooks."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""

    def __init__(self, step: int, last_checkpoint: str | os.PathLike[str] | None):
        self.step = step
        self.last_checkpoint = str(last_checkpoint) if last_checkpoint else None
        where = (
            f"last good checkpoint: {self.last_checkpoint} (resume with resume=auto after fixing the cause)"
            if self.last_checkpoint
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"loss is not finite (NaN or inf) at step {step}; stopping. {where}. "
            "Common causes: learning rate too high, fp16 overflow (try mixed_precision=bf16), bad input data."
        )


class FiniteGuard:
    """Remembers the first step whose loss was not finite, without a host sync every step.

    ``update`` stays on the device; ``check`` (call it every few steps, before every checkpoint and
    at the end) synchronises once and raises :class:`NonFiniteLossError` naming that step.
    ``reduce`` makes all processes agree (e.g. ``lambda t: accelerator.gather(t).max()``) so that
    every rank stops at the same call instead of one rank leaving the others in a collective.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        step_t = torch.full_like(self.first_bad, step)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step_t, self.first_bad)

    def check(
        self,
        last_checkpoint: str | os.PathLike[str] | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        flag = self.first_bad
        if reduce is not None:
            flag = reduce(flag.reshape(1)).reshape(())
        step = int(flag)
        if step >= 0:
            raise NonFiniteLossError(step, last_checkpoint)



def fault_hook(step: int) -> None:
    """Test-only fault injection: ``MEDPRETRAIN_FAULT_EXIT_AT_STEP=k`` hard-exits (like SIGKILL, no
    cleanup) right after optimizer step ``k``; with ``MEDPRETRAIN_FAULT_RANK=r`` only process ``r`` does."""
    at = os.environ.get("MEDPRETRAIN_FAULT_EXIT_AT_STEP")
    rank = os.environ.get("MEDPRETRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if at and int(at) == step:
        os._exit(137)


def inject_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Test-only: ``MEDPRETRAIN_FAULT_NAN_AT_STEP=k`` turns the loss of step ``k`` into NaN."""
    at = os.environ.get("MEDPRETRAIN_FAULT_NAN_AT_STEP")
    if at and int(at) == step:
        return loss * float("nan")
    return loss
