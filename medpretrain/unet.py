"""A U-Net whose encoder is the project's backbone (segmentation transfer).

:class:`UNet` wraps a :class:`medpretrain.backbones.Backbone` unchanged (registered as ``backbone``,
also reachable as ``encoder``), so a contract checkpoint loads into ``unet.encoder`` with an exact key
check and :func:`medpretrain.regimes.apply_regime` freezes its stages as it does for a classifier.
The decoder is U-Net-like (Ronneberger et al., MICCAI 2015) but light: from the deepest map upwards,
upsample to the next skip's size, concatenate, two 3x3 conv-BN-ReLU; a 1x1 head at the end and a
bilinear upsample to the input size. Upsampling goes to the skip's exact size, so any input size the
backbone accepts works (no divisibility requirement).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
