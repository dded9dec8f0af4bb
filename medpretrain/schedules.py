"""Learning-rate schedules defined in optimizer steps, and the optimisers' fast path."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def fused(params: Iterable[Any]) -> bool | None:
    """``True`` when every parameter (tensors or param-group dicts) is a floating-point tensor on a device with
    fused Adam / AdamW / SGD kernels, else ``None`` (torch's default): ``torch.optim.AdamW(..., fused=fused(p))``.

    The fused kernels do the update of all tensors in one pass: on this 2-core CPU the AdamW step of a
    ResNet-18 takes 9 ms instead of 35-58 ms (for-loop default), a third of a 28 px fine-tuning step. The
    result equals the for-loop update to float rounding.
    """
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    ok = all(t.is_floating_point() and t.device.type in FUSED_DEVICES for t in tensors)
    return True if ok and tensors else None


def warmup_cosine(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``final`` at ``total``."""
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))

