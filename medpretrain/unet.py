"""U-Nets for segmentation: the project's backbone as encoder (transfer), or a small network from scratch.

:class:`UNet` wraps a :class:`medpretrain.backbones.Backbone` unchanged (registered as ``backbone``,
also reachable as ``encoder``), so a contract checkpoint loads into ``unet.encoder`` with an exact key
check and :func:`medpretrain.regimes.apply_regime` freezes its stages as it does for a classifier.
The decoder is U-Net-like (Ronneberger et al., MICCAI 2015) but light: from the deepest map upwards,
upsample to the next skip's size, concatenate, two 3x3 conv-BN-ReLU; a 1x1 head at the end. Upsampling goes
to the skip's exact size, so any input size the backbone accepts works (no divisibility requirement).

Full resolution (``full_resolution=True``, ``seg.full_resolution``): most encoders' finest map is at stride 2
(ResNet's and EfficientNet's stems), and a decoder that stops there predicts thin structures (retinal
capillaries one or two pixels wide) from a bilinear upsampling. With the option the decoder gains one level at
the input's resolution, as Ronneberger's U-Net and segmentation-models-pytorch's ``Unet`` have: two 3x3
conv-BN-ReLU on the image itself (the full-resolution skip) fused with the upsampled stride-2 level. These are
decoder modules: the encoder's keys, and what the regimes freeze, do not change. An encoder whose finest map
already is at stride 1 (the small stem, CBR nets) needs no extra level and gets none.

:class:`SmallEncoder` + :func:`small_unet` (``seg.model=small``): a dedicated U-Net of 69 k parameters
trained from scratch, in the spirit of Little W-Net (Galdran et al., 2022: 68 k parameters, DRIVE F1 0.828)
and Transfusion's small CBR nets (Raghu et al., NeurIPS 2019): the baseline that says whether transfer beats a
tiny purpose-built model. :func:`build_seg_model` builds either from ``seg.model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medpretrain.backbones import Backbone
from medpretrain.config import ConfigError

SEG_MODELS = ("unet", "small")
"""``seg.model`` choices: the backbone's U-Net, or :func:`small_unet` from scratch."""
SMALL_WIDTHS = (12, 24, 48)
"""Channels of :func:`small_unet`'s levels (strides 1, 2, 4), encoder and decoder alike: 69 k parameters with
one input channel (Little W-Net: 68 k)."""


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Backbone encoder + light U-Net decoder. ``forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]``.

    Args: backbone: a Backbone (``forward_features``, ``feature_channels``; ``feature_strides`` and
    ``in_channels`` for ``full_resolution``); num_classes: output channels (1 for binary with a sigmoid);
    decoder_channels: width of each decoder level, shallow to deep (default: ``min(c, 256)`` for each encoder
    level ``c``); full_resolution: add a decoder level at the input's resolution when the finest encoder map is
    coarser (see the module docstring; ``full_channels`` wide, default ``min(decoder_channels[0], 32)``).
    Without it, the head's output is bilinearly upsampled to the input size. Frozen encoder stages
    (``frozen``, set by :func:`~medpretrain.regimes.apply_regime`) stay in eval mode whatever ``train()`` says.
    Raises ``ValueError`` for a backbone without feature maps or a bad ``num_classes``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 1, decoder_channels: Sequence[int] | None = None,
                 full_resolution: bool = False, full_channels: int | None = None):
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
        strides = list(getattr(backbone, "feature_strides", []) or [])
        self.full_resolution = bool(full_resolution and (not strides or strides[0] > 1))
        head_in = dec[0]
        if self.full_resolution:
            in_channels = int(getattr(backbone, "in_channels"))  # noqa: B009 (contract attribute)
            width = full_channels or min(dec[0], 32)
            if width < 1:
                raise ValueError(f"full_channels must be >= 1, got {full_channels}")
            self.full_skip = _conv_block(in_channels, width)  # features of the image itself, stride 1
            self.full_up = _conv_block(dec[0] + width, width)
            head_in = width
        self.head = nn.Conv2d(head_in, num_classes, 1)
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
        if self.full_resolution:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            y = self.full_up(torch.cat([y, self.full_skip(x)], dim=1))
        y = self.head(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y

    def train(self, mode: bool = True) -> UNet:
        super().train(mode)
        for name in self.frozen:
            self.backbone.get_submodule(name).eval()  # frozen: BN statistics do not move
        return self


class SmallEncoder(Backbone):
    """The encoder of a plain U-Net: levels of two 3x3 conv-BN-ReLU, a 2x2 max-pool (ceil mode, so any size
    from 1 px works) before every level but the first; maps at strides 1, 2, 4, ... A
    :class:`~medpretrain.backbones.Backbone` (pooled ``forward``, ``forward_features``, one regime stage per
    level: ``levels.<i>``) that is not a registered architecture: only :func:`small_unet` builds it.

    Raises ``ValueError`` for no level or a non-positive width.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = SMALL_WIDTHS):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"SmallEncoder needs at least one positive width, got {widths}")
        self.levels = nn.ModuleList(_conv_block(c_in, c) for c_in, c in zip([in_channels, *widths[:-1]], widths,
                                                                            strict=True))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self._set_info("small_unet", in_channels, "standard", widths[-1], widths,
                       [2**i for i in range(len(widths))], "levels.0.0.weight", "levels.0.1")
        self.stages = [[f"levels.{i}"] for i in range(len(widths))]

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, level in enumerate(self.levels):
            x = level(self.pool(x) if i else x)
            out.append(x)
        return out


def small_unet(in_channels: int, num_classes: int = 1, widths: Sequence[int] = SMALL_WIDTHS) -> UNet:
    """A small U-Net from scratch: :class:`SmallEncoder` and a decoder of the same widths, output at the
    input's resolution (69 k parameters with the default widths and one input channel)."""
    return UNet(SmallEncoder(in_channels, widths), num_classes, decoder_channels=list(widths))


def build_seg_model(kind: str, backbone: nn.Module, *, init: str = "scratch", regime: str = "full",
                    num_classes: int = 1, full_resolution: bool = False) -> UNet:
    """The segmentation model of ``seg.model``: ``unet`` (``backbone`` as the encoder; ``full_resolution``) or
    ``small`` (:func:`small_unet` with ``backbone``'s input channels; ``backbone`` itself is unused).

    Raises :class:`~medpretrain.config.ConfigError` for an unknown kind, or for ``small`` with an init other than
    ``scratch`` or a ``reinit`` regime (it has no pretrained weights and no registered architecture to re-draw).
    """
    if kind == "unet":
        return UNet(backbone, num_classes, full_resolution=full_resolution)
    if kind != "small":
        raise ConfigError(f"seg.model={kind!r} is not one of {list(SEG_MODELS)}")
    if init != "scratch":
        raise ConfigError(f"seg.model=small is trained from scratch; init={init!r} has no weights for it "
                          "(use init=scratch)")
    if regime.strip().startswith("reinit"):
        raise ConfigError(f"seg.model=small: regime={regime!r} needs a registered architecture; use full or "
                          "freeze:<k>")
    return small_unet(int(getattr(backbone, "in_channels")), num_classes)  # noqa: B009 (contract attribute)
