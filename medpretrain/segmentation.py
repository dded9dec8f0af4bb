"""Segmentation transfer: a U-Net whose encoder is the project's backbone, and binary segmentation metrics.

:class:`UNet` wraps a :class:`medpretrain.backbones.Backbone` unchanged (registered as ``backbone``,
also reachable as ``encoder``), so a contract checkpoint loads into ``unet.encoder`` with an exact key
check and :func:`medpretrain.regimes.apply_regime` freezes its stages as it does for a classifier.
The decoder is U-Net-like (Ronneberger et al., MICCAI 2015) but light: from the deepest map upwards,
upsample to the next skip's size, concatenate, two 3x3 conv-BN-ReLU; a 1x1 head at the end and a
bilinear upsample to the input size. Upsampling goes to the skip's exact size, so any input size the
backbone accepts works (no divisibility requirement).

Metrics (:func:`segmentation_metrics`) take probabilities, binary targets and an optional region of
interest (DRIVE scores inside the field of view): Dice, Jaccard, sensitivity, specificity, pixel AUC.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

from medpretrain.utils import atomic_path

SEG_METRICS: tuple[str, ...] = ("dice", "jaccard", "sensitivity", "specificity", "auc")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Backbone encoder + light U-Net decoder. ``forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]``.

    Args: backbone: a Backbone (``forward_features``, ``feature_channels``); num_classes: output channels
    (1 for binary with a sigmoid); decoder_channels: width of each decoder level, shallow to deep
    (default: ``min(c, 256)`` for each encoder level ``c``). Frozen encoder stages (``frozen``, set by
    :func:`~medpretrain.regimes.apply_regime`) stay in eval mode whatever ``train()`` says.
    Raises ``ValueError`` for a backbone without feature maps or a bad ``num_classes``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 1, decoder_channels: Sequence[int] | None = None):
        super().__init__()
        chans = list(getattr(backbone, "feature_channels", []) or [])
        if not chans or not hasattr(backbone, "forward_features"):
            raise ValueError("UNet needs a backbone with forward_features and feature_channels")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        dec = list(decoder_channels) if decoder_channels is not None else [min(c, 256) for c in chans]
        if len(dec) != len(chans):
            raise ValueError(f"decoder_channels needs {len(chans)} entries (one per encoder level), got {len(dec)}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.bottleneck = nn.Conv2d(chans[-1], dec[-1], 1)
        # up[i] fuses decoder level i+1 (upsampled) with encoder skip i.
        self.up = nn.ModuleList(_conv_block(dec[i + 1] + chans[i], dec[i]) for i in range(len(chans) - 1))
        self.head = nn.Conv2d(dec[0], num_classes, 1)
        self.frozen: list[str] = []

    @property
    def encoder(self) -> nn.Module:
        """The backbone itself (same module, same state-dict keys as a classifier's backbone)."""
        return self.backbone

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone.forward_features(x)  # type: ignore[operator]
        y = self.bottleneck(feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            skip = feats[i]
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = self.up[i](torch.cat([y, skip], dim=1))
        y = self.head(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y

    def train(self, mode: bool = True) -> UNet:
        super().train(mode)
        for name in self.frozen:
            self.backbone.get_submodule(name).eval()  # frozen: BN statistics do not move
        return self


def _flat(probs: Tensor | np.ndarray, target: Tensor | np.ndarray,
          roi: Tensor | np.ndarray | None) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(probs).detach().float().cpu()
    t = torch.as_tensor(target).detach().cpu()
    if p.shape != t.shape:
        raise ValueError(f"probs {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    if roi is None:
        return p.reshape(-1), (t > 0.5).reshape(-1).long()
    r = torch.as_tensor(roi).detach().cpu()
    if r.shape != p.shape:
        raise ValueError(f"roi {tuple(r.shape)} and probs {tuple(p.shape)} differ in shape")
    keep = r.reshape(-1) > 0.5
    return p.reshape(-1)[keep], (t > 0.5).reshape(-1)[keep].long()


def segmentation_metrics(probs: Tensor | np.ndarray, target: Tensor | np.ndarray, roi: Tensor | np.ndarray | None = None,
                         *, threshold: float = 0.5, auc_max_pixels: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Pixel metrics of one image (or a stack, pooled) inside ``roi``.

    ``probs`` are foreground probabilities, ``target`` and ``roi`` in {0, 1}, all the same shape. Dice =
    2TP / (2TP + FP + FN), Jaccard = TP / (TP + FP + FN) (both 1.0 when prediction and target are empty),
    sensitivity = TP / (TP + FN), specificity = TN / (TN + FP) (NaN when undefined), pixel ROC AUC through
    torchmetrics on a seeded subsample of at most ``auc_max_pixels`` pixels (NaN with one class).
    """
    p, t = _flat(probs, target, roi)
    pred = p >= threshold
    pos = t.bool()
    tp = float((pred & pos).sum())
    fp = float((pred & ~pos).sum())
    fn = float((~pred & pos).sum())
    tn = float((~pred & ~pos).sum())
    nan = float("nan")
    denom = 2 * tp + fp + fn
    out = {
        "dice": 2 * tp / denom if denom else 1.0,
        "jaccard": tp / (tp + fp + fn) if denom else 1.0,
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "specificity": tn / (tn + fp) if tn + fp else nan,
    }
    if 0 < int(t.sum()) < t.numel():
        if t.numel() > auc_max_pixels:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(t.numel(), generator=g)[:auc_max_pixels]
            p, t = p[idx], t[idx]
        out["auc"] = float(binary_auroc(p, t))
    else:
        out["auc"] = nan
    return out


def per_image_metrics(probs: Sequence[Tensor | np.ndarray], targets: Sequence[Tensor | np.ndarray],
                      rois: Sequence[Tensor | np.ndarray | None] | None = None, **kwargs: float) -> list[dict[str, float]]:
    """:func:`segmentation_metrics` of each image."""
    rois_: Sequence[Tensor | np.ndarray | None] = rois if rois is not None else [None] * len(probs)
    return [segmentation_metrics(p, t, r, **kwargs) for p, t, r in zip(probs, targets, rois_, strict=True)]  # type: ignore[arg-type]


def mean_metrics(rows: Sequence[dict[str, float]], keys: Sequence[str] = SEG_METRICS) -> dict[str, float]:
    """Mean over images of each metric (NaNs ignored; NaN when all are NaN)."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def bootstrap_images(rows: Sequence[dict[str, float]], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     keys: Sequence[str] = SEG_METRICS) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CI of the per-image mean of each metric, resampling test images."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    out: dict[str, dict[str, float]] = {}
    if n == 0:
        raise ValueError("bootstrap_images needs at least one image")
    idx = rng.integers(0, n, size=(n_boot, n))
    a = (1 - level) / 2
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        with warnings.catch_warnings():  # all-NaN resamples (e.g. sensitivity on empty masks) give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(v[idx], axis=1)
        means = means[np.isfinite(means)]
        lo, hi = (np.quantile(means, [a, 1 - a]) if means.size else (np.nan, np.nan))
        out[k] = {"low": float(lo), "high": float(hi)}
    return out


PROB_LEVELS = 65535
"""Saved probability maps are uint16: ``value / PROB_LEVELS`` (:func:`save_predictions`)."""


def quantize_probs(probs: np.ndarray, roi: np.ndarray | None = None) -> np.ndarray:
    """Probabilities in [0, 1] -> uint16 ``rint(p * 65535)``, 0 outside ``roi``.

    Rounding is done in float64, so ``q >= 32768`` exactly when ``p >= 0.5``: metrics at threshold 0.5
    (Dice, Jaccard, sensitivity, specificity) of the dequantised map equal those of the float map; the
    pixel AUC changes only through ties (steps of 1/65535). 16 bits rather than 8: an undertrained model's
    probabilities can all lie within a few 1/255 steps, and 8 bits then moved its AUC by 0.02 (measured).
    Raises ``ValueError`` for values outside [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("quantize_probs: probabilities must be finite and in [0, 1]")
    q = np.rint(p * PROB_LEVELS).astype(np.uint16)
    if roi is not None:
        q[np.asarray(roi) <= 0.5] = 0  # never scored; zeros compress well
    return q


def save_predictions(path: str | Path, probs: np.ndarray, masks: np.ndarray, rois: np.ndarray,
                     index: np.ndarray, names: Sequence[str] | None = None) -> Path:
    """Test predictions of one segmentation run as a compressed ``.npz`` (no pickles).

    Keys: ``test_probs`` uint16 ``[N, H, W]`` (:func:`quantize_probs`, 0 outside the roi), ``test_masks`` and
    ``test_rois`` uint8 {0, 1} ``[N, H, W]``, ``test_index`` int64 ``[N]`` (dataset order), ``test_names``
    (unicode ``[N]``; the indices as text when the dataset has no names). Written atomically.
    """
    probs, masks, rois = np.asarray(probs), np.asarray(masks), np.asarray(rois)
    if not probs.shape == masks.shape == rois.shape or probs.ndim != 3:
        raise ValueError(f"probs {probs.shape}, masks {masks.shape}, rois {rois.shape}: need three equal [N, H, W]")
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) != len(probs):
        raise ValueError(f"{len(index)} indices for {len(probs)} images")
    text = [str(n) for n in names] if names is not None else [str(i) for i in index]
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, test_probs=quantize_probs(probs, rois), test_masks=(masks > 0.5).astype(np.uint8),
                            test_rois=(rois > 0.5).astype(np.uint8), test_index=index, test_names=np.array(text))
    return Path(path)


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Read :func:`save_predictions` output: ``probs`` float32 in [0, 1], ``masks``, ``rois``, ``index``, ``names``."""
    with np.load(Path(path), allow_pickle=False) as z:
        return {"probs": (z["test_probs"] / PROB_LEVELS).astype(np.float32), "masks": z["test_masks"],
                "rois": z["test_rois"], "index": z["test_index"], "names": z["test_names"]}
