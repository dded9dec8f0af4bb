"""Backbones by name: torchvision ResNet / DenseNet / VGG / Inception, small plain CBR nets, the DCGAN
discriminator trunks ``dcgan_d1`` ... ``dcgan_d6``, and any timm CNN as ``timm:<name>`` (e.g.
``timm:tf_efficientnet_lite0``).

Every backbone is a :class:`Backbone` (an ``nn.Module``) with

* ``forward(x [B, C, H, W]) -> [B, num_features]`` (globally average-pooled features),
* ``forward_map(x) -> [B, num_features, h, w]``: the map ``forward`` pools, before pooling,
* ``forward_features(x) -> list[Tensor]``: multi-scale maps, shallow to deep, with channels
  ``feature_channels`` and nominal strides ``feature_strides`` (for a U-Net encoder),
* attributes ``arch``, ``in_channels``, ``stem``, ``num_features``, ``feature_channels``,
  ``feature_strides``, ``min_input_size``, ``first_conv_key`` (state-dict key of the first conv,
  the one adapted when channels or the stem differ from ImageNet's) and ``first_norm_key`` (prefix of the
  BatchNorm right after a bias-free first conv, or None: where a folded input normalisation puts its
  constant, :func:`medpretrain.init.fold_input_normalisation`).

For the torchvision architectures the state-dict keys are exactly torchvision's minus the classifier
(see :func:`torchvision_head_prefixes`), so ImageNet weights load with an exact key check.

Stems (``stem=``):

* ``standard``: the architecture as published.
* ``small``, for 28-64 px images: ResNet ``conv1`` becomes 3x3 stride 1 and the max-pool is removed
  (the key stays ``conv1.weight``, shape ``[64, C, 3, 3]``); DenseNet likewise for ``features.conv0`` and
  ``features.pool0``; VGG drops its first max-pool (16x instead of 32x downsampling; no weights change);
  the CBR nets and DCGAN trunks have no stem, so ``small`` builds the same network as ``standard``. Inception-v3 has no
  small stem (``ValueError``); it needs inputs of at least 75x75.

timm backbones (:class:`TimmBackbone`): ``timm.create_model(name, num_classes=0, in_chans=C)`` held as
``net`` (keys: timm's own under ``net.``, classifier dropped), the published stem only (``stem`` must be
``standard``; ``auto`` resolves to it), maps tapped at the model's ``feature_info`` modules by forward hooks,
the deepest replaced by ``forward_features`` (for EfficientNet the 1280-channel head output), stages for the
regimes derived from ``feature_info`` (:attr:`TimmBackbone.stages`). timm is imported only when one is built.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

STEMS = ("standard", "small")
SMALL_STEM_BELOW = 96
"""``resolve_stem("auto", size)`` picks the small stem below this many pixels."""


class Backbone(nn.Module):
    """Base class: a feature extractor with a pooled ``forward`` and a multi-scale ``forward_features``."""

    arch: str
    in_channels: int
    stem: str
    num_features: int
    feature_channels: list[int]
    feature_strides: list[int]
    min_input_size: int
    first_conv_key: str
    first_norm_key: str | None

    def _set_info(
        self,
        arch: str,
        in_channels: int,
        stem: str,
        num_features: int,
        feature_channels: list[int],
        feature_strides: list[int],
        first_conv_key: str,
        first_norm_key: str | None = None,
    ) -> None:
        self.arch = arch
        self.in_channels = in_channels
        self.stem = stem
        self.num_features = num_features
        self.feature_channels = list(feature_channels)
        self.feature_strides = list(feature_strides)
        self.min_input_size = min_image_size(arch, stem)
        self.first_conv_key = first_conv_key
        self.first_norm_key = first_norm_key

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, H, W]`` with H, W >= ``min_input_size``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} backbone expects input [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        check_image_size(self.arch, self.stem, int(x.shape[-2]), int(x.shape[-1]))

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, num_features]``: the global average of :meth:`forward_map`."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_map(x), 1), 1)

    def forward_map(self, x: Tensor) -> Tensor:
        """The spatial map ``[B, num_features, h, w]`` that :meth:`forward` pools (dense objectives such as
        DenseCL contrast its locations)."""
        self.check_input(x)
        return self._last_map(x)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Multi-scale feature maps, shallow to deep; ``len == len(feature_channels)``."""
        self.check_input(x)
        return self._maps(x)

    # Subclasses implement these two.
    def _maps(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _last_map(self, x: Tensor) -> Tensor:
        return self._maps(x)[-1]


def _new_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, bias: bool, init: str
) -> nn.Conv2d:
    """A conv initialised the way torchvision initialises that architecture's convs."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)
    if init == "fan_out":  # ResNet, VGG
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif init == "fan_in":  # DenseNet
        nn.init.kaiming_normal_(conv.weight)
    elif init == "trunc":  # Inception-v3
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.1, a=-2, b=2)
    else:  # pragma: no cover - programming error
        raise AssertionError(init)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# ------------------------------------------------------------------------------------------------
# ResNet
# ------------------------------------------------------------------------------------------------


class ResNetBackbone(Backbone):
    """torchvision ResNet without ``fc``; maps after ``relu`` (stem) and ``layer1..layer4``."""

    def __init__(self, arch: str, in_channels: int, stem: str) -> None:
        super().__init__()
        tv = getattr(torchvision.models, arch)(weights=None)
        if stem == "small":
            conv1: nn.Module = _new_conv(in_channels, 64, 3, 1, 1, False, "fan_out")
            maxpool: nn.Module = nn.Identity()
        else:
            conv1 = tv.conv1 if in_channels == 3 else _new_conv(in_channels, 64, 7, 2, 3, False, "fan_out")
            maxpool = tv.maxpool
        # Same attribute names and order as torchvision, so the state-dict keys are identical.
        self.conv1 = conv1
        self.bn1 = tv.bn1
        self.relu = tv.relu
        self.maxpool = maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        expansion = 4 if arch in ("resnet50", "resnet101", "resnet152") else 1
        chans = [64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        strides = [1, 1, 2, 4, 8] if stem == "small" else [2, 4, 8, 16, 32]
        self._set_info(arch, in_channels, stem, chans[-1], chans, strides, "conv1.weight", "bn1")

    def _maps(self, x: Tensor) -> list[Tensor]:
        x0 = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x0, x1, x2, x3, x4]


# ------------------------------------------------------------------------------------------------
# DenseNet
# ------------------------------------------------------------------------------------------------


class DenseNetBackbone(Backbone):
    """torchvision DenseNet: ``features.*`` only (no ``classifier``).

    Maps after ``relu0``, ``denseblock1..3`` (before their transitions) and ``relu(norm5)``.
    """

    _TAPS = ("relu0", "denseblock1", "denseblock2", "denseblock3")

    def __init__(self, arch: str, in_channels: int, stem: str) -> None:
        super().__init__()
        tv = getattr(torchvision.models, arch)(weights=None)
        self.features = tv.features
        if stem == "small":
            self.features.conv0 = _new_conv(in_channels, 64, 3, 1, 1, False, "fan_in")
            self.features.pool0 = nn.Identity()
        elif in_channels != 3:
            self.features.conv0 = _new_conv(in_channels, 64, 7, 2, 3, False, "fan_in")
        n = tv.classifier.in_features
        chans = [64, 256, 512, 1024, n] if arch == "densenet121" else self._probe_channels(in_channels)
        strides = [1, 1, 2, 4, 8] if stem == "small" else [2, 4, 8, 16, 32]
        self._set_info(arch, in_channels, stem, n, chans, strides, "features.conv0.weight", "features.norm0")

    def _probe_channels(self, in_channels: int) -> list[int]:  # pragma: no cover - other densenets
        with torch.no_grad():
            return [m.shape[1] for m in self._maps(torch.zeros(1, in_channels, 64, 64))]

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._TAPS:
                out.append(x)
        out.append(nn.functional.relu(x))  # torchvision applies this ReLU after norm5 in forward()
        return out


# ------------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------------


_VGG_CFG = {"vgg16_bn": "D"}


class VGGBackbone(Backbone):
    """torchvision VGG (with BN): ``features.*`` only; the 7x7 ``avgpool`` and ``classifier`` are dropped.

    Pooled output = global average of the last ``features`` output (512). Maps are the outputs just
    before each max-pool (channels 64, 128, 256, 512, 512).
    """

    def __init__(self, arch: str, in_channels: int, stem: str) -> None:
        super().__init__()
        # Only the features are built: torchvision's 100M-parameter classifier would take seconds to init.
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs[_VGG_CFG[arch]], batch_norm=True)
        for m in self.features.modules():  # torchvision's VGG init for these module types
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if in_channels != 3:
            self.features[0] = _new_conv(in_channels, 64, 3, 1, 1, True, "fan_out")
        self._pool_idx = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        if stem == "small":
            # Parameter-free change: the keys and shapes stay torchvision's.
            self.features[self._pool_idx[0]] = nn.Identity()
        chans = [self.features[i - 2].num_features for i in self._pool_idx]  # the BN before each pool
        strides = [1, 1, 2, 4, 8] if stem == "small" else [1, 2, 4, 8, 16]
        self._set_info(arch, in_channels, stem, chans[-1], chans, strides, "features.0.weight")

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, module in enumerate(self.features):
            if i in self._pool_idx:
                out.append(x)
            x = module(x)
        return out

    def _last_map(self, x: Tensor) -> Tensor:
        return self.features(x)


# ------------------------------------------------------------------------------------------------
# Inception-v3
# ------------------------------------------------------------------------------------------------


class InceptionBackbone(Backbone):
    """torchvision Inception-v3 with ``aux_logits=False`` and ``transform_input=False``, without ``fc``.

    ``transform_input`` is off: torchvision turns it on with ImageNet weights to map ImageNet-normalised
    RGB to the [-1, 1] range Google's weights expect; our data is normalised by ``DataConfig.mean/std``
    (default 0.5/0.5, already [-1, 1]). Maps after ``Conv2d_2b_3x3``, ``Conv2d_4a_3x3``, ``Mixed_5d``,
    ``Mixed_6e``, ``Mixed_7c``; Inception uses unpadded convs, so their sizes are only roughly
    H/2 ... H/32 and a decoder must resize. Needs H, W >= 75.
    """

    _TAPS = ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")
    _DROP = ("AuxLogits", "avgpool", "dropout", "fc")

    def __init__(self, arch: str, in_channels: int, stem: str) -> None:
        super().__init__()
        tv = torchvision.models.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True)
        for name, module in tv.named_children():
            if name not in self._DROP and module is not None:
                self.add_module(name, module)
        if in_channels != 3:
            first: nn.Module = getattr(self, "Conv2d_1a_3x3")  # noqa: B009 - typed access to a BasicConv2d
            first.conv = _new_conv(in_channels, 32, 3, 2, 0, False, "trunc")
        chans = [64, 192, 288, 768, 2048]
        self._set_info(arch, in_channels, stem, 2048, chans, [2, 4, 8, 16, 32], "Conv2d_1a_3x3.conv.weight",
                       "Conv2d_1a_3x3.bn")

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for name, module in self.named_children():
            x = module(x)
            if name in self._TAPS:
                out.append(x)
        return out


# ------------------------------------------------------------------------------------------------
# CBR nets (Transfusion, Raghu et al. 2019)
# ------------------------------------------------------------------------------------------------


class CBRBackbone(Backbone):
    """Plain conv-BN-ReLU net (Raghu et al., "Transfusion", NeurIPS 2019).

    Each block: ``Conv(k, stride 1, same padding, no bias) -> BN -> ReLU``, then ``MaxPool(3, stride 2,
    padding 1)``; global average pool at the end. Keys: ``blocks.<i>.conv|bn.*``. Maps are the block
    outputs before their pool (strides 1, 2, 4, 8). Works from 1 px up; ``stem`` has no effect.
    """

    def __init__(self, arch: str, in_channels: int, stem: str, channels: tuple[int, ...], kernel: int) -> None:
        super().__init__()
        blocks = []
        prev = in_channels
        for c in channels:
            conv = _new_conv(prev, c, kernel, 1, kernel // 2, False, "fan_out")
            blocks.append(nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c), relu=nn.ReLU(inplace=True))))
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        strides = [2**i for i in range(len(channels))]
        self._set_info(arch, in_channels, stem, channels[-1], list(channels), strides, "blocks.0.conv.weight",
                       "blocks.0.bn")

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            out.append(x)
        return out

    def _last_map(self, x: Tensor) -> Tensor:
        # The pooled output follows the last block's max-pool, as in the paper's nets.
        return self.pool(self._maps(x)[-1])


# ------------------------------------------------------------------------------------------------
# DCGAN discriminator trunk (Radford et al. 2015)
# ------------------------------------------------------------------------------------------------

DCGAN_D_WIDTH = 64
"""Channels of the first block of the ``dcgan_d<n>`` trunks (the paper's ``ndf``), doubling per block up to 512."""
DCGAN_D_DEPTHS = range(1, 7)
"""Registered depths: ``dcgan_d1`` (8 px) ... ``dcgan_d6`` (256 px); see :class:`DCGANDiscriminatorBackbone`."""


class DCGANDiscriminatorBackbone(Backbone):
    """The strided-conv discriminator of Radford et al. 2015 (DCGAN) without its last conv, as a trunk.

    ``depth`` blocks of ``Conv(4x4, stride 2, padding 1, no bias) -> BatchNorm -> LeakyReLU(0.2)``, the
    first without BatchNorm (as in the paper), channels ``64 * 2**i`` capped at 512; the paper's
    initialisation (conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02)). Keys: ``blocks.<i>.conv|bn.*``.
    Maps are the block outputs (strides 2 .. ``2**depth``); the pooled output is the global mean of the last.
    The DCGAN script picks the depth from the image size (``dcgan_d2`` at 28 px, ``d3`` at 32, ``d4`` at 64,
    ``d5`` at 128), so its exported trunk is a registered backbone that fine-tuning builds by name. Needs
    inputs of at least ``2**depth`` px; ``stem`` has no effect.
    """

    def __init__(self, arch: str, in_channels: int, stem: str, depth: int) -> None:
        super().__init__()
        chans = [min(512, DCGAN_D_WIDTH * 2**i) for i in range(depth)]
        blocks, prev = [], in_channels
        for i, c in enumerate(chans):
            conv = nn.Conv2d(prev, c, 4, 2, 1, bias=False)
            nn.init.normal_(conv.weight, 0.0, 0.02)
            layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
            if i > 0:
                bn = nn.BatchNorm2d(c)
                nn.init.normal_(bn.weight, 1.0, 0.02)
                nn.init.zeros_(bn.bias)
                layers["bn"] = bn
            layers["act"] = nn.LeakyReLU(0.2, inplace=True)
            blocks.append(nn.Sequential(layers))
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.stages = [[f"blocks.{i}"] for i in range(depth)]  # one stage per block (freeze:<k>, reinit:<k>)
        self._set_info(arch, in_channels, stem, chans[-1], chans, [2 ** (i + 1) for i in range(depth)],
                       "blocks.0.conv.weight", None)

    def _maps(self, x: Tensor) -> list[Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------

TIMM_PREFIX = "timm:"
"""``backbone.arch=timm:<name>`` names any timm model (``timm.list_models()``) that gives spatial maps."""


def is_timm_arch(arch: str) -> bool:
    """True for ``timm:<name>`` architecture names."""
    return arch.startswith(TIMM_PREFIX)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _units(net: nn.Module, taps: list[str]) -> list[str]:
    """Module paths in execution (registration) order, expanded down to the level of the tap paths."""
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(t.startswith(path + ".") for t in taps):
                walk(child, path + ".")
            else:
                out.append(path)

    walk(net, "")
    return out


def timm_stages(net: nn.Module, taps: list[str]) -> list[list[str]]:
    """Stages of a timm model for the regimes, from its ``feature_info`` tap modules ``taps``.

    The modules before the first tap form the stem; each tap closes a stage (the modules after the
    previous tap up to and including it); modules after the last tap (EfficientNet's ``conv_head``,
    ``bn2``) join the last stage; modules and stages without parameters are dropped. For EfficientNet-Lite0:
    ``[conv_stem, bn1], [blocks.0], [blocks.1], [blocks.2], [blocks.3, blocks.4], [blocks.5, blocks.6,
    conv_head, bn2]``; for a timm ResNet the torchvision stages ``[conv1, bn1], [layer1] ... [layer4]``.
    """
    units = _units(net, taps)
    first = units.index(taps[0])
    stages: list[list[str]] = [units[:first]]  # the stem
    current: list[str] = []
    for path in units[first:]:
        current.append(path)
        if path in taps:
            stages.append(current)
            current = []
    stages[-1].extend(current)
    kept = [[p for p in st if _has_params(net.get_submodule(p))] for st in stages]
    return [st for st in kept if st]


class TimmBackbone(Backbone):
    """A timm model without classifier: ``timm.create_model(name, num_classes=0, in_chans=C)`` as ``net``.

    Pooled output: global average of ``net.forward_features(x)`` (``num_features`` channels, timm's own
    ``forward_head(pre_logits=True)`` with average pooling). Maps: the outputs of the ``feature_info``
    modules (forward hooks), the deepest replaced by ``forward_features`` (same stride; for EfficientNet
    the head conv's 1280 channels instead of the last block's 320, so every parameter is used by a U-Net).
    ``stages``: :func:`timm_stages`, names prefixed ``net.``. Only the published stem exists.
    Raises ``ValueError`` for an unknown timm name or a model without 4-D feature maps (transformers).
    """

    net: Any  # the timm model (typed loosely: timm's methods are not in nn.Module's stubs)

    def __init__(self, arch: str, in_channels: int, stem: str) -> None:
        super().__init__()
        import timm  # the architecture zoo; imported only when a timm backbone is built

        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.8)
            raise ValueError(f"unknown timm model {name!r} (arch {arch!r}){'; similar: ' + ', '.join(near) if near else ''}")
        if stem != "standard":
            raise ValueError(f"{arch} has only its published stem; use stem='standard' (got {stem!r})")
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        info = list(getattr(net, "feature_info", None) or [])
        if not info:
            raise ValueError(f"{arch}: timm model without feature_info, cannot tap multi-scale maps")
        self.net = net
        self._taps = [f"{f['module']}" for f in info[:-1]]
        self.stages = [[f"net.{p}" for p in st] for st in timm_stages(net, [str(f["module"]) for f in info])]
        first = str((getattr(net, "pretrained_cfg", None) or {}).get("first_conv") or "")
        modules = list(net.named_modules())
        if not first or not isinstance(net.get_submodule(first), nn.Conv2d):
            first = next(n for n, m in modules if isinstance(m, nn.Conv2d))
        conv = net.get_submodule(first)
        norm = None
        if conv.bias is None:  # the BatchNorm right after the first conv (registration order = execution order)
            names = [n for n, _ in modules]
            norm = next((n for n, m in modules[names.index(first) + 1:]
                         if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                maps = self._maps(torch.zeros(1, in_channels, 64, 64))
        except Exception as e:  # a model that cannot run as a CNN at 64 px (fixed-size transformers ...)
            raise ValueError(f"{arch}: cannot run as a CNN backbone on a 64x64 input ({e})") from None
        finally:
            net.train(was_training)
        if any(m.ndim != 4 for m in maps):
            raise ValueError(f"{arch}: timm model does not give 4-D feature maps {[list(m.shape) for m in maps]}")
        chans = [int(m.shape[1]) for m in maps]
        strides = [int(f["reduction"]) for f in info]
        self._set_info(arch, in_channels, stem, int(self.net.num_features), chans, strides, f"net.{first}.weight",
                       f"net.{norm}" if norm else None)

    def _maps(self, x: Tensor) -> list[Tensor]:
        taps: list[Tensor] = []
        hooks = [self.net.get_submodule(p).register_forward_hook(lambda _m, _i, out: taps.append(out))
                 for p in self._taps]
        try:
            last = self.net.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return [*taps, last]

    def _last_map(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_Builder = Callable[[int, str], Backbone]


def _dcgan_d(depth: int, in_channels: int, stem: str) -> Backbone:
    return DCGANDiscriminatorBackbone(f"dcgan_d{depth}", in_channels, stem, depth)


_REGISTRY: dict[str, _Builder] = {
    "resnet18": lambda c, s: ResNetBackbone("resnet18", c, s),
    "resnet50": lambda c, s: ResNetBackbone("resnet50", c, s),
    "densenet121": lambda c, s: DenseNetBackbone("densenet121", c, s),
    "vgg16_bn": lambda c, s: VGGBackbone("vgg16_bn", c, s),
    "inception_v3": lambda c, s: InceptionBackbone("inception_v3", c, s),
    # Transfusion's CBR-Small: 4 blocks of 32/64/128/256 filters, 7x7 kernels.
    "cbr_small": lambda c, s: CBRBackbone("cbr_small", c, s, (32, 64, 128, 256), 7),
    # Smaller still (our choice, not the paper's table): 4 blocks of 16/32/64/128 filters, 5x5 kernels.
    "cbr_tiny": lambda c, s: CBRBackbone("cbr_tiny", c, s, (16, 32, 64, 128), 5),
    # Radford et al.'s DCGAN discriminator trunk with n stride-2 blocks (what generative/dcgan.py exports).
    **{f"dcgan_d{n}": functools.partial(_dcgan_d, n) for n in DCGAN_D_DEPTHS},
}

_HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "resnet18": ("fc.",),
    "resnet50": ("fc.",),
    "densenet121": ("classifier.",),
    "vgg16_bn": ("classifier.",),
    "inception_v3": ("fc.", "AuxLogits."),
}
_NO_SMALL_STEM = frozenset({"inception_v3"})
_MIN_SIZE: dict[tuple[str, str], int] = {
    ("inception_v3", "standard"): 75,
    ("densenet121", "standard"): 29,
    ("densenet121", "small"): 8,
    ("vgg16_bn", "standard"): 32,
    ("vgg16_bn", "small"): 16,
    **{(f"dcgan_d{n}", stem): 2**n for n in DCGAN_D_DEPTHS for stem in STEMS},
}


def has_depthwise_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (``groups == in_channels > 1``)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def apply_memory_format(model: nn.Module, choice: str = "auto") -> bool:
    """Put ``model`` in ``channels_last`` when ``choice`` says so (``auto``: when it has depthwise convolutions,
    see ``BackboneConfig.memory_format``); the parameters stay the same objects. Returns whether it did."""
    if choice not in ("auto", "channels_last", "contiguous"):
        raise ValueError(f"memory_format must be auto, channels_last or contiguous, got {choice!r}")
    last = choice == "channels_last" or (choice == "auto" and has_depthwise_conv(model))
    if last:
        model.to(memory_format=torch.channels_last)
    return last


def available_backbones() -> list[str]:
    """Registered architecture names, sorted (any timm CNN is available too, as ``timm:<name>``)."""
    return sorted(_REGISTRY)


def torchvision_archs() -> list[str]:
    """Architectures whose keys are torchvision's (and for which ImageNet weights exist)."""
    return sorted(_HEAD_PREFIXES)


def torchvision_head_prefixes(arch: str) -> tuple[str, ...]:
    """Key prefixes of the torchvision classifier that the backbone drops (e.g. ``("fc.",)``).

    Raises ``ValueError`` for architectures that are not torchvision models.
    """
    if arch not in _HEAD_PREFIXES:
        raise ValueError(f"{arch!r} is not a torchvision architecture; those are {torchvision_archs()}")
    return _HEAD_PREFIXES[arch]


def min_image_size(arch: str, stem: str) -> int:
    """Smallest H and W the backbone accepts."""
    return _MIN_SIZE.get((arch, stem), 1)


def check_image_size(arch: str, stem: str, height: int, width: int | None = None) -> None:
    """Raise ``ValueError`` if an image of ``height x width`` is too small for ``arch`` with ``stem``."""
    width = height if width is None else width
    m = min_image_size(arch, stem)
    if height < m or width < m:
        hint = " (Inception-v3 has no small stem: resize the images to >= 75 px)" if arch == "inception_v3" else ""
        raise ValueError(f"{arch} with stem={stem!r} needs images of at least {m}x{m}, got {height}x{width}{hint}")


def resolve_stem(stem: str, image_size: int | None, arch: str | None = None) -> str:
    """Map ``"auto"`` to ``"small"`` below 96 px, else ``"standard"``; validate explicit stems.

    With ``arch`` given, ``auto`` never picks a stem that ``arch`` lacks (Inception-v3 and timm backbones:
    always standard).
    Raises ``ValueError`` for an unknown stem, or ``auto`` without an image size.
    """
    if stem == "auto":
        if image_size is None:
            raise ValueError("stem='auto' needs the image size; pass image_size or choose 'standard'/'small'")
        if arch in _NO_SMALL_STEM or (arch is not None and is_timm_arch(arch)):
            return "standard"
        return "small" if image_size < SMALL_STEM_BELOW else "standard"
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {list(STEMS) + ['auto']}")
    return stem


def build_backbone(
    arch: str, in_channels: int = 1, stem: str = "standard", *, image_size: int | None = None
) -> Backbone:
    """Build a randomly initialised backbone (torchvision's default init; timm's for ``timm:<name>``).

    ``stem`` is ``standard``, ``small`` or ``auto`` (then ``image_size`` is needed). With
    ``image_size`` given, it is checked against the architecture's minimum. Seed with the caller's RNG.
    Raises ``ValueError`` for an unknown arch, bad ``in_channels`` (1 or 3), an unsupported stem or a too
    small image size.
    """
    timm_arch = is_timm_arch(arch)
    if arch not in _REGISTRY and not timm_arch:
        raise ValueError(f"unknown backbone {arch!r}; available: {available_backbones()} or timm:<name>")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    stem = resolve_stem(stem, image_size, arch)
    if stem == "small" and arch in _NO_SMALL_STEM:
        raise ValueError(f"{arch} has no small stem; use stem='standard' with images of at least 75x75")
    if stem == "small" and timm_arch:
        raise ValueError(f"{arch} has no small stem (timm backbones keep their published stem); use "
                         "stem='standard', and choose the size it runs at with data.image_size")
    if image_size is not None:
        check_image_size(arch, stem, image_size)
    backbone = TimmBackbone(arch, in_channels, stem) if timm_arch else _REGISTRY[arch](in_channels, stem)
    log.debug("built %s (in_channels=%d, stem=%s)", arch, in_channels, stem)
    return backbone
