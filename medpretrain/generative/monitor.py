"""Sample diversity and mode-collapse detection (DCGAN), summary statistics of generated images, and the
reconstruction quality numbers PSNR and SSIM (:func:`psnr`, :func:`ssim`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
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


def diversity_ratio(fake: Tensor, real: Tensor, labels: Tensor | None = None) -> float:
    """Generated-batch diversity over real-batch diversity (:func:`pairwise_diversity`); near 0: collapse.

    With ``labels`` (a conditional batch: the fakes drawn for the real images' classes) the ratio is taken
    within each class that has at least 2 images in the batch, and the lowest is returned: a conditional
    generator that draws one image per class keeps the whole batch varied (the classes differ) while every
    class has collapsed. ``nan`` when no class has 2 images (the monitor counts it as a strike only when the
    real images of no class vary either, which a shuffled batch of any size above K makes rare)."""
    if labels is None:
        real_div = pairwise_diversity(real)
        return pairwise_diversity(fake) / real_div if real_div > 0 else float("nan")
    ratios = []
    for c in torch.unique(labels):
        keep = labels == c
        if int(keep.sum()) >= 2:
            real_div = pairwise_diversity(real[keep])
            if real_div > 0:
                ratios.append(pairwise_diversity(fake[keep]) / real_div)
    return min(ratios) if ratios else float("nan")


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

    def update(self, fake_div: float, real_div: float = 1.0) -> bool:
        """One check: ``fake_div / real_div`` (or, with the default ``real_div``, a ratio already taken, e.g.
        :func:`diversity_ratio`'s lowest within-class ratio) below the threshold is a strike."""
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


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``[B]``, in dB: ``10 log10(data_range^2 / MSE)`` over each
    image's pixels (``inf`` for identical images). ``x``, ``y``: ``[B, C, H, W]`` of the same shape."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr needs two [B, C, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image, ``[B]`` (Wang et al. 2004): the mean over channels and over every
    ``window x window`` position inside the image (no padding, as the paper's reference code) of
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``, with Gaussian-weighted
    local statistics (``sigma`` 1.5), ``C1 = (0.01 data_range)^2`` and ``C2 = (0.03 data_range)^2``. 1 for
    identical images. Images smaller than the window use the largest odd window that fits. Differentiable
    (usable as a loss). ``x``, ``y``: ``[B, C, H, W]`` of the same shape, at least 3x3.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}")
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2  # odd
    if size < 3:
        raise ValueError(f"ssim needs images of at least 3x3, got {list(x.shape[-2:])}")
    x, y = x.float(), y.float()
    channels = x.shape[1]
    w = _gaussian_window(size, sigma, x.device).expand(channels, 1, size, size)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), w, groups=channels).split(x.shape[0])
    mu_x, mu_y = stats[0], stats[1]
    # E[x^2] - mu^2 can come out a hair below 0 in float32 on flat regions: variances are clamped at 0
    var_x, var_y, cov = (stats[2] - mu_x**2).clamp(min=0), (stats[3] - mu_y**2).clamp(min=0), stats[4] - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
