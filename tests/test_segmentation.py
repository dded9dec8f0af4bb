"""medpretrain.unet and the segmentation metrics of medpretrain.metrics: U-Net shapes over odd sizes, the encoder
contract, the full-resolution decoder level, the small from-scratch U-Net (``seg.model=small``), vessel-weighted
patches, metrics against known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, load_backbone_state, load_state_dict, save_backbone
from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import build_dataset
from medpretrain.data.transforms import Compose, PairedRandomCrop, PairedRandomFlip
from medpretrain.finetune import main_in_process
from medpretrain.metrics import bootstrap_images, mean_metrics, segmentation_metrics
from medpretrain.regimes import Classifier, apply_regime, backbone_stages
from medpretrain.results import read_results
from medpretrain.unet import SMALL_WIDTHS, UNet, build_seg_model, small_unet


@pytest.mark.parametrize(("arch", "stem", "size"), [("cbr_tiny", "standard", (33, 34)),
                                                     ("resnet18", "small", (37, 30)),
                                                     ("resnet18", "standard", (65, 70))])
def test_unet_output_at_input_resolution(arch, stem, size):
    torch.manual_seed(0)
    net = UNet(build_backbone(arch, 3, stem), num_classes=2).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, *size))
    assert y.shape == (2, 2, *size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_ch", [1, 3])
def test_unet_on_a_timm_encoder_at_odd_sizes(in_ch):
    from conftest import require_module

    require_module("timm", "pip install -e '.[dev]' (scripts/setup.sh) installs it")
    torch.manual_seed(0)
    encoder = build_backbone("timm:tf_efficientnet_lite0", in_ch, "auto", image_size=33)
    net = UNet(encoder, num_classes=1)
    assert net.encoder is encoder and net.up[0][0].in_channels == 24 + 16  # decoder level 1 (24) + skip 0 (16)
    net.eval()
    for size in [(33, 47), (64, 64), (20, 29)]:
        with torch.no_grad():
            y = net(torch.randn(2, in_ch, *size))
        assert y.shape == (2, 1, *size) and torch.isfinite(y).all()
    # Training: every encoder parameter gets a gradient (the deepest map is the head conv's output).
    net.train()
    net(torch.randn(2, in_ch, 33, 47)).mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_contract_checkpoint_loads_into_unet_encoder_and_classifier_exactly(tmp_path):
    torch.manual_seed(0)
    bb = build_backbone("resnet18", 1, "small")
    path = save_backbone(tmp_path / "bb.safetensors", bb,
                         BackboneMeta(arch="resnet18", in_channels=1, stem="small", image_size=64, mean=0.5,
                                      std=0.5, method="simclr", dataset="drive:"))
    state, _ = load_backbone_state(path)
    unet = UNet(build_backbone("resnet18", 1, "small"))
    assert unet.encoder is unet.backbone
    msg = unet.encoder.load_state_dict(state, strict=True)
    assert not msg.missing_keys and not msg.unexpected_keys
    clf = Classifier(build_backbone("resnet18", 1, "small"), 2)
    msg = clf.backbone.load_state_dict(state, strict=True)
    assert not msg.missing_keys and not msg.unexpected_keys
    for k, v in state.items():
        assert torch.equal(unet.encoder.state_dict()[k], v)
    # The U-Net's own keys are the encoder's under "backbone." plus decoder keys only.
    enc_keys = {k[len("backbone."):] for k in unet.state_dict() if k.startswith("backbone.")}
    assert enc_keys == set(state)


def test_linear_regime_freezes_encoder_trains_decoder():
    torch.manual_seed(0)
    unet = UNet(build_backbone("cbr_tiny", 1, "standard"))
    before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    groups, info = apply_regime(unet, "linear", lr=1e-2)  # type: ignore[arg-type]
    assert info.frozen_params == sum(p.numel() for p in unet.encoder.parameters())
    opt = torch.optim.SGD(groups, lr=1e-2)
    unet.train()
    x = torch.randn(2, 1, 32, 32)
    loss = unet(x).mean()
    loss.backward()
    opt.step()
    after = unet.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not any(m.training for m in unet.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_metrics_known_dice():
    target = torch.zeros(10, 10)
    target[:, :5] = 1  # 50 foreground
    pred = torch.zeros(10, 10)
    pred[:, 3:8] = 1  # 20 TP, 30 FP, 30 FN
    m = segmentation_metrics(pred, target)
    assert m["dice"] == pytest.approx(40 / 100)
    assert m["jaccard"] == pytest.approx(20 / 80)
    assert m["sensitivity"] == pytest.approx(20 / 50)
    assert m["specificity"] == pytest.approx(20 / 50)
    # Perfect probabilities: AUC 1; inverted: 0.
    assert segmentation_metrics(target * 0.9, target)["auc"] == pytest.approx(1.0)
    assert segmentation_metrics(1 - target, target)["auc"] == pytest.approx(0.0)


def test_metrics_inside_roi_only():
    target = torch.zeros(8, 8)
    target[2:4, 2:4] = 1
    pred = target.clone()
    pred[6:, 6:] = 1  # false positives outside the roi
    roi = torch.zeros(8, 8)
    roi[:5, :5] = 1
    assert segmentation_metrics(pred, target, roi)["dice"] == pytest.approx(1.0)
    assert segmentation_metrics(pred, target)["dice"] == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="roi"):
        segmentation_metrics(pred, target, roi[:4])


def test_auc_against_naive_reference():
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(40, 40, generator=g) < 0.3).float()
    p = (t * 0.3 + torch.rand(40, 40, generator=g) * 0.7)
    pos, neg = p[t > 0], p[t == 0]
    ref = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    assert segmentation_metrics(p, t)["auc"] == pytest.approx(float(ref), abs=1e-5)


def test_empty_masks_and_aggregation():
    z = torch.zeros(4, 4)
    m = segmentation_metrics(z, z)
    assert m["dice"] == 1.0 and np.isnan(m["sensitivity"]) and np.isnan(m["auc"])
    rows = [{"dice": 0.2, "jaccard": 0.1, "sensitivity": 0.5, "specificity": 0.9, "auc": 0.8},
            {"dice": 0.4, "jaccard": 0.3, "sensitivity": float("nan"), "specificity": 0.7, "auc": 0.6}]
    mean = mean_metrics(rows)
    assert mean["dice"] == pytest.approx(0.3) and mean["sensitivity"] == pytest.approx(0.5)
    ci = bootstrap_images(rows, n_boot=200)
    assert 0.2 <= ci["dice"]["low"] <= ci["dice"]["high"] <= 0.4


def test_drive_crops_paired_and_scored(data_root):
    """Real DRIVE: paired crops keep image / vessel mask / field of view aligned; ground truth scores Dice 1."""
    ds = build_dataset(DataConfig(dataset="drive:", root=str(data_root)), "train")
    s = ds[0]
    assert s["image"].shape[-2:] == s["mask"].shape[-2:] == s["roi"].shape[-2:] == (584, 565)
    tf = Compose([PairedRandomCrop(64, seed=0), PairedRandomFlip(seed=0)])
    crops = [tf(s) for _ in range(8)]
    for c in crops:
        assert c["image"].shape[-2:] == c["mask"].shape[-2:] == c["roi"].shape[-2:] == (64, 64)
    m = segmentation_metrics(s["mask"], s["mask"], s["roi"])
    assert m["dice"] == 1.0 and m["auc"] == pytest.approx(1.0)
    # Vessels are roughly 8-16 % of the field of view in DRIVE; an all-vessel guess has Dice 2f/(1+f).
    frac = float((s["mask"] * s["roi"]).sum() / s["roi"].sum())
    assert 0.05 < frac < 0.2
    assert segmentation_metrics(torch.ones_like(s["mask"]), s["mask"], s["roi"])["dice"] == pytest.approx(
        2 * frac / (1 + frac), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Full-resolution decoder level, the small U-Net, vessel-weighted patches
# --------------------------------------------------------------------------------------------------


def output_rank(net: torch.nn.Module, size: tuple[int, int], n: int = 160) -> int:
    """Dimension of the span of ``n`` outputs for random inputs: a map upsampled from stride 2 has at most
    ceil(H/2) * ceil(W/2) degrees of freedom, a full-resolution one up to H * W."""
    torch.manual_seed(1)
    with torch.no_grad():
        y = net.eval()(torch.randn(n, int(net.backbone.in_channels), *size))
    return int(torch.linalg.matrix_rank(y.flatten(1).double(), rtol=1e-4))  # above float32 rounding


@pytest.mark.parametrize(("arch", "stem", "width"), [("resnet18", "standard", 32),
                                                      ("timm:tf_efficientnet_lite0", "standard", 16)])
def test_full_resolution_level_predicts_at_every_pixel_at_odd_sizes(arch, stem, width):
    torch.manual_seed(0)
    size = (13, 11)
    coarse = UNet(build_backbone(arch, 1, stem))
    full = UNet(build_backbone(arch, 1, stem), full_resolution=True)
    assert not coarse.full_resolution and full.full_resolution and full.head.in_channels == width  # min(32, level 0)
    for h, w in [size, (33, 34), (65, 70)]:
        with torch.no_grad():
            y = full.eval()(torch.randn(2, 1, h, w))
        assert y.shape == (2, 1, h, w) and torch.isfinite(y).all()
    assert output_rank(coarse, size) <= 7 * 6  # bilinear upsampling of a 7 x 6 map
    assert output_rank(full, size) > 2 * 7 * 6  # 143 here: every pixel predicted on its own
    # Trains end to end: the encoder and the new level get gradients.
    full.train()
    full(torch.randn(2, 1, 33, 34)).mean().backward()
    assert all(p.grad is not None for p in full.parameters())


def test_full_resolution_adds_nothing_to_an_encoder_already_at_stride_one():
    torch.manual_seed(0)
    for arch, stem in [("resnet18", "small"), ("cbr_tiny", "standard")]:
        plain, full = UNet(build_backbone(arch, 1, stem)), UNet(build_backbone(arch, 1, stem), full_resolution=True)
        assert not full.full_resolution and set(full.state_dict()) == set(plain.state_dict())


def test_full_resolution_keeps_the_encoder_contract_and_the_regimes(tmp_path):
    torch.manual_seed(0)
    bb = build_backbone("resnet18", 1, "standard")
    path = save_backbone(tmp_path / "bb.safetensors", bb,
                         BackboneMeta(arch="resnet18", in_channels=1, stem="standard", image_size=64, mean=0.5,
                                      std=0.5, method="simclr", dataset="drive:"))
    state, _ = load_backbone_state(path)
    unet = UNet(build_backbone("resnet18", 1, "standard"), full_resolution=True)
    msg = unet.encoder.load_state_dict(state, strict=True)
    assert not msg.missing_keys and not msg.unexpected_keys
    assert {k[len("backbone."):] for k in unet.state_dict() if k.startswith("backbone.")} == set(state)
    new = {k.split(".")[0] for k in unet.state_dict() if not k.startswith("backbone.")}
    assert new == {"bottleneck", "up", "full_skip", "full_up", "head"}  # decoder modules only
    # freeze:2 freezes the stem and layer1 (weights and BN statistics), everything else trains; the full-resolution
    # level belongs to the decoder and trains under linear too.
    stages = backbone_stages(unet.backbone)
    _, info = apply_regime(unet, "freeze:2", lr=1e-3)  # type: ignore[arg-type]
    frozen = sum(p.numel() for s in stages[:2] for n in s for p in unet.backbone.get_submodule(n).parameters())
    assert info.frozen_params == frozen and unet.frozen == ["conv1", "bn1", "layer1"]
    assert all(p.requires_grad for p in unet.backbone.layer2.parameters())
    lin = UNet(build_backbone("resnet18", 1, "standard"), full_resolution=True)
    _, info = apply_regime(lin, "linear", lr=1e-3)  # type: ignore[arg-type]
    assert info.frozen_params == sum(p.numel() for p in lin.encoder.parameters())
    assert all(p.requires_grad for m in (lin.full_skip, lin.full_up, lin.head) for p in m.parameters())
    lin.train()
    assert lin.full_skip.training and not lin.backbone.layer1.training


def test_small_unet_is_about_70k_parameters_and_full_resolution_at_odd_sizes():
    torch.manual_seed(0)
    net = small_unet(1)
    assert sum(p.numel() for p in net.parameters()) == 69049 and SMALL_WIDTHS == (12, 24, 48)
    assert net.backbone.feature_strides == [1, 2, 4] and not net.full_resolution  # stride 1 already
    for size in [(33, 34), (5, 7), (1, 1), (64, 64)]:
        with torch.no_grad():
            y = net.eval()(torch.randn(2, 1, *size))
        assert y.shape == (2, 1, *size) and torch.isfinite(y).all()
    assert output_rank(net, (9, 7), n=100) > 5 * 4 * 2  # 63 pixels, not a 5 x 4 grid
    assert net.backbone(torch.randn(3, 1, 9, 7)).shape == (3, 48)  # pooled features (BN re-estimation, CKA)
    three = small_unet(3)
    assert three(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    # Its encoder's stages are its levels: freeze:1 freezes levels.0 only.
    _, info = apply_regime(net, "freeze:1", lr=1e-3)  # type: ignore[arg-type]
    assert net.frozen == ["levels.0"]
    assert info.frozen_params == sum(p.numel() for p in net.backbone.levels[0].parameters())


def test_build_seg_model_choices_and_refusals():
    bb = build_backbone("cbr_tiny", 1, "standard")
    assert build_seg_model("unet", bb).backbone is bb
    assert build_seg_model("unet", build_backbone("resnet18", 1, "standard"), full_resolution=True).full_resolution
    small = build_seg_model("small", build_backbone("resnet18", 3, "standard"))
    assert small.backbone.arch == "small_unet" and small.backbone.in_channels == 3
    with pytest.raises(ConfigError, match=r"^seg.model=small is trained from scratch; init='simclr'"):
        build_seg_model("small", bb, init="simclr")
    with pytest.raises(ConfigError, match="regime='reinit:1' needs a registered architecture"):
        build_seg_model("small", bb, regime="reinit:1")
    with pytest.raises(ConfigError, match="seg.model='wnet' is not one of"):
        build_seg_model("wnet", bb)


def test_uniform_patches_draw_as_before_and_foreground_patches_find_vessels(data_root):
    ds = build_dataset(DataConfig(dataset="drive:", root=str(data_root)), "train")
    s = ds[0]
    h, w = s["mask"].shape[-2:]
    # foreground=0: the corner draws of a uniform crop, from the same generator as before the option existed.
    g = torch.Generator().manual_seed(3)
    crop = PairedRandomCrop(48, seed=3)
    for _ in range(5):
        top, left = (int(torch.randint(0, n - 48 + 1, (1,), generator=g).item()) for n in (h, w))
        assert torch.equal(crop(s)["mask"], s["mask"][..., top:top + 48, left:left + 48])
    # foreground=1: every window is centred (up to the image border) on a vessel pixel inside the field of view.
    fg = PairedRandomCrop(48, seed=0, foreground=1.0)
    centred = [fg(s) for _ in range(40)]
    assert all(c["mask"][0, 24, 24] > 0 and c["roi"][0, 24, 24] > 0 for c in centred)
    uni = PairedRandomCrop(48, seed=0)
    uniform = [uni(s) for _ in range(40)]
    assert np.mean([float(c["mask"].mean()) for c in centred]) > 1.5 * np.mean([float(c["mask"].mean())
                                                                                 for c in uniform])
    # Half the windows: about half are centred on a vessel (vessels cover ~12 % of the uniform ones' centres).
    half = PairedRandomCrop(48, seed=0, foreground=0.5)
    hits = np.mean([float(half(s)["mask"][0, 24, 24]) for _ in range(200)])
    assert 0.4 < hits < 0.7
    # No foreground at all: uniform windows, no error.
    empty = {**s, "mask": torch.zeros_like(s["mask"])}
    assert fg(empty)["mask"].shape == (1, 48, 48)
    with pytest.raises(ValueError, match="foreground must be in"):
        PairedRandomCrop(48, foreground=1.5)
    # Windows near the border are shifted inside the image, not padded.
    corner = torch.zeros_like(s["mask"])
    corner[0, 0, 0] = 1
    c = PairedRandomCrop(48, seed=0, foreground=1.0)({"image": s["image"], "mask": corner})
    assert c["mask"][0, 0, 0] == 1 and c["image"].shape == (1, 48, 48)


def test_small_unet_fine_tunes_on_drive_from_scratch(tmp_path):
    """``seg.model=small`` through finetune/run.py on real DRIVE: a few steps, the 69 k parameters train, the
    model file says what it is, and a pretrained init is refused."""
    root = Path(__file__).resolve().parent.parent
    args = ["--config", str(root / "configs/finetune_drive.yaml"), "seg.model=small", "seg.n_train_images=2",
            "data.image_size=128", "seg.patch_size=64", "seg.patches_per_image=4", "optim.batch_size=8", "optim.steps=6",
            "optim.eval_every=3", "seg.sw_batch_size=64", "seg.sw_overlap=0", "n_bootstrap=20", "seg.n_overlays=1",
            "eval.reuse_images=0"]
    out = tmp_path / "small"
    assert main_in_process([*args, "init=scratch", f"output_dir={out}"]) == 0
    res = read_results(out / "results.json")
    assert res is not None and res.status == "complete" and res.regime_info["trainable_params"] == 69049
    assert res.optimizer_steps == 6 and 0.0 < res.metrics["test"]["dice"] < 1.0
    assert len(res.per_image) == 20
    state, meta = load_state_dict(out / "model.safetensors")
    assert meta["seg_model"] == "small" and meta["arch"] == "small_unet"
    assert "backbone.levels.0.0.weight" in state and sum(v.numel() for k, v in state.items()
                                                         if "running" not in k and "num_batches" not in k) == 69049
    torch.manual_seed(0)
    init = save_backbone(tmp_path / "bb.safetensors", build_backbone("cbr_tiny", 1, "standard"),
                         BackboneMeta(arch="cbr_tiny", in_channels=1, stem="standard", image_size=64, mean=0.5, std=0.5,
                                      method="simclr", dataset="drive:"))
    with pytest.raises(ConfigError, match="seg.model=small is trained from scratch"):
        main_in_process([*args, "backbone.arch=cbr_tiny", f"init={init}", f"output_dir={tmp_path / 'refused'}"])


class _Gather:
    """The accelerator's one call predict_images makes, in one process."""

    @staticmethod
    def gather_for_metrics(x):
        return x


def test_predict_images_window_size_and_flip_tta():
    """One window covering the image is the plain forward pass; ``seg.tta=flips`` is the mean probability of the
    four flips, each flipped back (a conv net that is not flip-symmetric, so the four differ)."""
    from medpretrain.finetune import FinetuneConfig, predict_images

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1))
    x = torch.rand(2, 1, 20, 20)
    batch = {"image": x, "mask": torch.zeros(2, 1, 20, 20), "roi": torch.ones(2, 1, 20, 20), "index": torch.arange(2)}
    cfg = FinetuneConfig(task="segmentation")
    cfg.seg.patch_size, cfg.seg.sw_size = 8, 20
    with torch.no_grad():
        plain = torch.sigmoid(model(x))[:, 0]
        flipped = [torch.sigmoid(model(x.flip(d)).flip(d))[:, 0] for d in [(-1,), (-2,), (-2, -1)]]
    one = predict_images(model, [batch], cfg, _Gather)["probs"]
    np.testing.assert_allclose(one, plain.numpy(), atol=1e-6)
    cfg.seg.tta = "flips"
    tta = predict_images(model, [batch], cfg, _Gather)["probs"]
    np.testing.assert_allclose(tta, ((plain + sum(flipped)) / 4).numpy(), atol=1e-6)
    assert np.abs(tta - one).max() > 1e-3  # the flips changed something: the test can tell them apart
    cfg.seg.tta, cfg.seg.sw_size = "none", 0  # 8 px windows (the patch size): borders differ from one window
    assert np.abs(predict_images(model, [batch], cfg, _Gather)["probs"] - one).max() > 1e-4
