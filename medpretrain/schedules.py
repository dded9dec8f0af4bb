"""Learning-rate schedules defined in optimizer steps."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``final`` at ``total``."""
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))

