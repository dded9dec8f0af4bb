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
    ("dcgan_d1", "small", [(8, 9)]),
    ("dcgan_d2", "small", SMALL_SIZES),
    ("dcgan_d3", "standard", [(33, 34)]),
    ("dcgan_d4", "small", [(64, 64)]),
    ("dcgan_d5", "standard", [(33, 34)]),
    ("dcgan_d6", "standard", [(64, 65)]),
]
EXPECTED_CHANNELS = {
    "resnet18": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
    "densenet121": [64, 256, 512, 1024, 1024],
    "vgg16_bn": [64, 128, 256, 512, 512],
    "inception_v3": [64, 192, 288, 768, 2048],
    "cbr_small": [32, 64, 128, 256],
    "cbr_tiny": [16, 32, 64, 128],
    **{f"dcgan_d{n}": [64, 128, 256, 512, 512, 512][:n] for n in range(1, 7)},
}


def _expected_sizes(b: Backbone, n: int) -> list[int]:
    """Reference map sizes: padded stride-2 convs/pools round up, unpadded 2x2 pools round down."""
    if b.arch.startswith(("resnet", "cbr")):
        return [math.ceil(n / s) for s in b.feature_strides]
    if b.arch == "vgg16_bn" or b.arch.startswith("dcgan_d"):  # 4x4 stride-2 convs, padding 1: round down
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


# ---------------------------------------------------------------------------------------------------------
# timm backbones (timm:<name>)
# ---------------------------------------------------------------------------------------------------------

LITE0 = "timm:tf_efficientnet_lite0"
LITE0_STAGES = [["net.conv_stem", "net.bn1"], ["net.blocks.0"], ["net.blocks.1"], ["net.blocks.2"],
                ["net.blocks.3", "net.blocks.4"], ["net.blocks.5", "net.blocks.6", "net.conv_head", "net.bn2"]]


@pytest.fixture(scope="module")
def timm_module():
    from conftest import require_module

    return require_module("timm", "pip install -e '.[dev]' (scripts/setup.sh) installs it")


@pytest.mark.parametrize("in_ch", [1, 3])
def test_timm_backbone_shapes_keys_and_stages(timm_module, in_ch: int) -> None:
    from medpretrain.regimes import backbone_stages

    torch.manual_seed(0)
    b = build_backbone(LITE0, in_ch, "auto", image_size=28).eval()
    assert (b.arch, b.in_channels, b.stem, b.num_features) == (LITE0, in_ch, "standard", 1280)
    assert b.feature_channels == [16, 24, 40, 112, 1280] and b.feature_strides == [2, 4, 8, 16, 32]
    assert (b.first_conv_key, b.first_norm_key) == ("net.conv_stem.weight", "net.bn1")
    assert backbone_stages(b) == LITE0_STAGES
    # Keys: timm's own minus the classifier, under "net."; first conv adapted to the input channels.
    full = timm_module.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    sd = b.state_dict()
    assert set(sd) == {f"net.{k}" for k in full if not k.startswith("classifier.")}
    assert sd["net.conv_stem.weight"].shape == (32, in_ch, 3, 3)
    for h, w in [(33, 47), (28, 28)]:
        x = torch.randn(2, in_ch, h, w)
        with torch.no_grad():
            y, maps = b(x), b.forward_features(x)
        # TensorFlow "same" padding: every stride-s level is ceil(n / s).
        assert [tuple(m.shape[-2:]) for m in maps] == [(math.ceil(h / s), math.ceil(w / s)) for s in b.feature_strides]
        assert [m.shape[1] for m in maps] == b.feature_channels
        torch.testing.assert_close(y, maps[-1].mean(dim=(2, 3)))
        with torch.no_grad():  # the pooled output is timm's own pre-logits
            torch.testing.assert_close(y, b.net.forward_head(b.net.forward_features(x), pre_logits=True))


def test_timm_stems_and_errors(timm_module) -> None:
    assert resolve_stem("auto", 28, LITE0) == "standard"
    with pytest.raises(ValueError, match=r"timm:tf_efficientnet_lite0 has no small stem .*data\.image_size"):
        build_backbone(LITE0, 1, "small")
    with pytest.raises(ValueError, match=r"unknown timm model 'tf_efficientnet_lite9'.*similar: .*tf_efficientnet_lite0"):
        build_backbone("timm:tf_efficientnet_lite9", 1)
    with pytest.raises(ValueError, match=r"timm:vit_tiny_patch16_224: cannot run as a CNN backbone on a 64x64 input"):
        build_backbone("timm:vit_tiny_patch16_224", 1)
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet19'.* or timm:<name>"):
        build_backbone("resnet19")


def test_timm_backbone_checkpoint_round_trip(timm_module, tmp_path) -> None:
    import safetensors
    import safetensors.torch

    from medpretrain.checkpoint import BackboneMeta, load_backbone, save_backbone

    torch.manual_seed(1)
    b = build_backbone(LITE0, 1, "standard")
    for m in b.modules():  # non-default BN statistics, so a silently re-initialised tensor would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    meta = BackboneMeta(arch=LITE0, in_channels=1, stem="standard", image_size=64, method="simclr")
    path = save_backbone(tmp_path / "bb.safetensors", b, meta)
    loaded, got = load_backbone(path, arch=LITE0)
    assert got.arch == LITE0 and isinstance(loaded, Backbone)
    assert list(loaded.state_dict()) == list(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in loaded.state_dict().items())
    # One tensor missing: refused, naming it.
    with safetensors.safe_open(str(path), "pt") as fh:
        header = fh.metadata()
    tensors = safetensors.torch.load_file(str(path))
    del tensors["net.blocks.5.2.bn3.running_var"]
    safetensors.torch.save_file(tensors, str(tmp_path / "short.safetensors"), metadata=header)
    with pytest.raises(ValueError, match=r"short\.safetensors: keys do not match TimmBackbone timm:tf_efficientnet_lite0: "
                       r"missing \['net\.blocks\.5\.2\.bn3\.running_var'\] \(1\), unexpected \[\] \(0\)"):
        load_backbone(tmp_path / "short.safetensors")


def test_timm_freeze_k_freezes_the_named_stages_only(timm_module) -> None:
    from medpretrain.regimes import Classifier, apply_regime

    torch.manual_seed(2)
    model = Classifier(build_backbone(LITE0, 1, "standard"), 2)
    _, info = apply_regime(model, "freeze:2", lr=0.1)
    frozen_prefixes = ("backbone.net.conv_stem.", "backbone.net.bn1.", "backbone.net.blocks.0.")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name
    assert model.frozen == ["net.conv_stem", "net.bn1", "net.blocks.0"]
    assert info.frozen_stages == [0, 1] and info.stages == LITE0_STAGES
    assert info.frozen_params == sum(p.numel() for n, p in model.named_parameters() if n.startswith(frozen_prefixes))
    # A training step moves the rest and neither the frozen weights nor their BatchNorm statistics.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.backbone.net.bn1.training and model.backbone.net.blocks[1].training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(frozen_prefixes):
            assert torch.equal(after[k], v), k
    for k in ("backbone.net.blocks.6.0.conv_pwl.weight", "backbone.net.blocks.1.0.bn1.running_mean", "head.weight"):
        assert not torch.equal(after[k], before[k]), k
    with pytest.raises(ValueError, match=r"k must be between 0 and 6"):
        apply_regime(Classifier(build_backbone(LITE0, 1, "standard"), 2), "freeze:7", lr=0.1)


@pytest.mark.slow
def test_simclr_pretrains_a_timm_backbone_and_exports(timm_module, data_root, tmp_path, monkeypatch) -> None:
    from medpretrain.checkpoint import load_backbone, read_meta
    from medpretrain.init import init_backbone
    from medpretrain.pretrain import main

    monkeypatch.setenv("MEDPRETRAIN_DATA", str(data_root))
    main("simclr", [f"backbone.arch={LITE0}", "data.image_size=32", "train.batch_size=8", "train.max_steps=3",
                    "train.log_every=1", "train.checkpoint_every=3", "train.knn_every=-1", f"out_dir={tmp_path}",
                    "run_name=lite0"])
    export = tmp_path / "lite0" / "backbone.safetensors"
    meta = read_meta(export)
    assert (meta.arch, meta.in_channels, meta.stem, meta.image_size, meta.method, meta.steps) == (
        LITE0, 1, "standard", 32, "simclr", 3)
    loaded, _ = load_backbone(export)
    # Trained: BatchNorm statistics start at 0 / 1 and moved in the three steps.
    assert loaded.state_dict()["net.bn2.num_batches_tracked"].item() == 3
    assert loaded.state_dict()["net.bn2.running_mean"].abs().max() > 0
    b, info = init_backbone("simclr", LITE0, 1, "auto", image_size=32, runs_dir=tmp_path)
    assert info.source == str(export)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in b.state_dict().items())


def test_memory_format_auto_is_channels_last_for_depthwise_nets_only(timm_module) -> None:
    from medpretrain.backbones import apply_memory_format, has_depthwise_conv

    lite0, resnet = build_backbone(LITE0, 1, "standard"), build_backbone("resnet18", 1, "standard")
    assert has_depthwise_conv(lite0) and not has_depthwise_conv(resnet)
    params = list(lite0.parameters())
    x = torch.randn(2, 1, 32, 32)
    lite0.eval()
    before = lite0(x)
    assert apply_memory_format(lite0, "auto") is True
    assert all(a is b for a, b in zip(params, lite0.parameters(), strict=True))  # an optimizer built earlier still holds them
    h = lite0.net.conv_stem(x)  # the activations follow the weights' layout
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    assert torch.allclose(lite0(x), before, atol=1e-5)  # same function, other layout
    assert apply_memory_format(resnet, "auto") is False
    assert resnet.conv1.weight.is_contiguous()
    assert apply_memory_format(resnet, "channels_last") is True
    assert resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert apply_memory_format(build_backbone(LITE0, 1, "standard"), "contiguous") is False
    with pytest.raises(ValueError, match="memory_format must be auto, channels_last or contiguous, got 'nhwc'"):
        apply_memory_format(resnet, "nhwc")
