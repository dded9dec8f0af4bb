"""Backbone registry: builds, shapes over odd sizes, feature maps, torchvision key compatibility."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from medpretrain.backbones import (
    Backbone,
    available_backbones,
    build_backbone,
    resolve_stem,
    torchvision_archs,
    torchvision_head_prefixes,
)

torch.set_num_threads(1)

# Sizes per arch that stay fast on a shared CPU: big nets get one odd size at batch 1.
SMALL_SIZES = [(28, 28), (33, 34), (64, 64)]
CASES = [
    ("resnet18", "small", SMALL_SIZES),
    ("resnet18", "standard", [(33, 34)]),
    ("resnet50", "small", [(33, 34)]),
    ("resnet50", "standard", [(64, 64)]),
    ("densenet121", "small", [(28, 28)]),
    ("densenet121", "standard", [(33, 34)]),
    ("vgg16_bn", "small", [(28, 28)]),
    ("vgg16_bn", "standard", [(33, 34)]),
    ("inception_v3", "standard", [(75, 75), (80, 83)]),
    ("cbr_small", "small", SMALL_SIZES),
    ("cbr_tiny", "standard", SMALL_SIZES),
]
EXPECTED_CHANNELS = {
    "resnet18": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
    "densenet121": [64, 256, 512, 1024, 1024],
    "vgg16_bn": [64, 128, 256, 512, 512],
    "inception_v3": [64, 192, 288, 768, 2048],
    "cbr_small": [32, 64, 128, 256],
    "cbr_tiny": [16, 32, 64, 128],
}


def _expected_sizes(b: Backbone, n: int) -> list[int]:
    """Reference map sizes: padded stride-2 convs/pools round up, unpadded 2x2 pools round down."""
    if b.arch.startswith(("resnet", "cbr")):
        return [math.ceil(n / s) for s in b.feature_strides]
    if b.arch == "vgg16_bn":
        return [n // s for s in b.feature_strides]
    assert b.arch == "densenet121"
    first = n if b.stem == "small" else math.ceil(n / 2)  # conv0 and pool0 are padded: round up
    base = n if b.stem == "small" else math.ceil(first / 2)
    return [first, base, base // 2, base // 4, base // 8]


def test_registry_lists_all_archs() -> None:
    assert available_backbones() == sorted(EXPECTED_CHANNELS)
    assert {a for a, _, _ in CASES} == set(available_backbones())


@pytest.mark.parametrize("arch,stem,sizes", CASES, ids=[f"{a}-{s}" for a, s, _ in CASES])
def test_forward_shapes_on_odd_sizes(arch: str, stem: str, sizes: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    b = build_backbone(arch, in_channels=1, stem=stem).eval()
    assert isinstance(b, Backbone)
    assert (b.arch, b.in_channels, b.stem) == (arch, 1, stem)
    assert b.feature_channels == EXPECTED_CHANNELS[arch]
    assert b.num_features == EXPECTED_CHANNELS[arch][-1]
    for h, w in sizes:
        x = torch.randn(1, 1, h, w)
        with torch.no_grad():
            y = b(x)
            maps = b.forward_features(x)
        assert y.shape == (1, b.num_features)
        assert torch.isfinite(y).all()
        assert [m.shape[1] for m in maps] == b.feature_channels
        assert len(maps) == len(b.feature_strides)
        if arch != "inception_v3":  # inception uses unpadded convs: sizes are only roughly H / stride
            got = [tuple(m.shape[-2:]) for m in maps]
            assert got == list(zip(_expected_sizes(b, h), _expected_sizes(b, w), strict=True))
        # The pooled output is the global mean of the deepest map (VGG, CBR: after their last max-pool).
        last = maps[-1]
        if arch == "vgg16_bn":
            last = torch.nn.functional.max_pool2d(last, 2)
        elif arch.startswith("cbr"):
            last = torch.nn.functional.max_pool2d(last, 3, stride=2, padding=1)
        torch.testing.assert_close(y, last.mean(dim=(2, 3)))


def test_resnet_small_stem_and_strides() -> None:
    b = build_backbone("resnet18", 1, "small")
    assert b.state_dict()["conv1.weight"].shape == (64, 1, 3, 3)
    assert isinstance(b.maxpool, torch.nn.Identity)
    b = build_backbone("resnet18", 3, "standard")
    assert b.state_dict()["conv1.weight"].shape == (64, 3, 7, 7)
    x = torch.randn(2, 3, 64, 64)
    maps = b.eval().forward_features(x)
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]


def test_batch_of_two_rgb() -> None:
    b = build_backbone("cbr_tiny", in_channels=3).eval()
    assert b(torch.randn(2, 3, 33, 34)).shape == (2, 128)


def _tv_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full torchvision model (built on the meta device: no memory, no init time)."""
    with torch.device("meta"):
        if arch == "inception_v3":
            m = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        else:
            m = getattr(torchvision.models, arch)(weights=None)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121", "vgg16_bn", "inception_v3"])
def test_state_dict_keys_equal_torchvision_minus_classifier(arch: str) -> None:
    tv_shapes = _tv_shapes(arch)
    tv = set(tv_shapes)
    heads = {k for k in tv if k.startswith(torchvision_head_prefixes(arch))}
    expected_heads = {
        "resnet18": {"fc.weight", "fc.bias"},
        "resnet50": {"fc.weight", "fc.bias"},
        "densenet121": {"classifier.weight", "classifier.bias"},
        "vgg16_bn": {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")},
    }
    if arch in expected_heads:
        assert heads == expected_heads[arch]
    else:
        assert {"fc.weight", "fc.bias"} < heads and all(k.startswith(("fc.", "AuxLogits.")) for k in heads)
    for in_ch in (3, 1):
        b = build_backbone(arch, in_ch, "standard")
        sd = b.state_dict()
        assert set(sd) == tv - heads
        # Shapes equal torchvision's, except the first conv's input channels when in_ch == 1.
        for k, v in sd.items():
            ref = tv_shapes[k]
            if k == b.first_conv_key:
                ref = (ref[0], in_ch, *ref[2:])
            assert tuple(v.shape) == ref, k


def test_torchvision_archs() -> None:
    assert torchvision_archs() == ["densenet121", "inception_v3", "resnet18", "resnet50", "vgg16_bn"]
    with pytest.raises(ValueError, match="not a torchvision architecture"):
        torchvision_head_prefixes("cbr_small")


def test_resolve_stem() -> None:
    assert resolve_stem("auto", 28) == "small"
    assert resolve_stem("auto", 95) == "small"
    assert resolve_stem("auto", 96) == "standard"
    assert resolve_stem("auto", 224) == "standard"
    assert resolve_stem("auto", 28, "inception_v3") == "standard"
    assert resolve_stem("small", 224) == "small"
    with pytest.raises(ValueError, match="needs the image size"):
        resolve_stem("auto", None)
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        resolve_stem("tiny", 28)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        build_backbone("resnet18", in_channels=2)
    with pytest.raises(ValueError, match="inception_v3 has no small stem"):
        build_backbone("inception_v3", 1, "small")
    with pytest.raises(ValueError, match="at least 75x75, got 64x64"):
        build_backbone("inception_v3", 1, "auto", image_size=64)
    b = build_backbone("inception_v3", 1, "standard")
    with pytest.raises(ValueError, match="at least 75x75, got 74x80"):
        b(torch.zeros(1, 1, 74, 80))
    with pytest.raises(ValueError, match=r"expects input \[B, 1, H, W\], got \[1, 3, 32, 32\]"):
        build_backbone("cbr_tiny", 1)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 32x32, got 28x28"):
        build_backbone("vgg16_bn", 1, "standard", image_size=28)
