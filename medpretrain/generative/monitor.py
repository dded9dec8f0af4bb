"""Sample diversity and mode-collapse detection (DCGAN), and summary statistics of generated images."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def pairwise_diversity(x: Tensor) -> float:
    """Mean pairwise Euclidean distance between the images of a batch, divided by sqrt(pixels).

    The result is the root-mean-square per-pixel difference of two random images, comparable across
    image sizes; 0 for a batch of identical images. Needs at least 2 images.
    """
    if x.shape[0] < 2:
        raise ValueError(f"pairwise_diversity needs at least 2 images, got {x.shape[0]}")
    flat = x.detach().float().flatten(1)
    return float(torch.pdist(flat).mean() / math.sqrt(flat.shape[1]))


class ModeCollapseError(RuntimeError):
    """Generated samples stopped varying (see :class:`CollapseMonitor`); the run stops instead of going on."""

    def __init__(self, step: int, ratio: float, threshold: float, patience: int, last_checkpoint: str | None):
        self.step, self.ratio = step, ratio
        where = f"last checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        super().__init__(
            f"mode collapse at step {step}: generated-batch diversity stayed below {threshold:.0%} of the real "
            f"batch's for {patience} consecutive checks (last ratio {ratio:.3f}); stopping. {where}. "
            "Try loss=hinge spectral_norm=true, a lower learning rate, or on_collapse=warn to continue anyway."
        )


class CollapseMonitor:
    """Flags mode collapse: generated-batch diversity below ``threshold`` x real-batch diversity for
    ``patience`` consecutive checks. Non-finite diversity counts as collapsed.

    ``update(fake_div, real_div) -> bool`` returns whether collapse is flagged now. ``state_dict`` /
    ``load_state_dict`` make it resumable (``state=`` of ``medpretrain.resume.save_checkpoint``).
    """

    def __init__(self, threshold: float = 0.2, patience: int = 3) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"collapse threshold must be in [0, 1], got {threshold}")
        if patience < 1:
            raise ValueError(f"collapse patience must be >= 1, got {patience}")
        self.threshold, self.patience = threshold, patience
        self.strikes = 0
        self.last_ratio = float("nan")

    def update(self, fake_div: float, real_div: float) -> bool:
        ratio = fake_div / real_div if real_div > 0 else float("nan")
        self.last_ratio = ratio
        if not math.isfinite(ratio) or ratio < self.threshold:
            self.strikes += 1
        else:
            self.strikes = 0
        return self.strikes >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strikes = int(state["strikes"])
        self.last_ratio = float(state["last_ratio"])


def sample_statistics(samples: Tensor, reference: Tensor | None = None, max_pairs_images: int = 512) -> dict[str, float]:
    """Summary numbers of images in [-1, 1], reported on the [0, 1] scale.

    ``mean``, ``std`` of pixel values, ``diversity`` (:func:`pairwise_diversity` on up to
    ``max_pairs_images`` images); with ``reference`` (real images) the same for it and
    ``diversity_ratio`` = samples' / reference's diversity (near 1: as varied as real data; near 0: collapse).
    """
    def stats(x: Tensor, prefix: str) -> dict[str, float]:
        x01 = (x.float().clamp(-1, 1) + 1) / 2
        return {f"{prefix}mean": float(x01.mean()), f"{prefix}std": float(x01.std()),
                f"{prefix}diversity": pairwise_diversity(x01[:max_pairs_images])}

    out = stats(samples, "")
    if reference is not None:
        out.update(stats(reference, "real_"))
        out["diversity_ratio"] = out["diversity"] / out["real_diversity"] if out["real_diversity"] > 0 else float("nan")
    return out
