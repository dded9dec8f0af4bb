"""medpretrain.unet and the segmentation metrics of medpretrain.metrics: U-Net shapes over odd sizes, the encoder contract, metrics against known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, load_backbone_state, save_backbone
from medpretrain.config import DataConfig
from medpretrain.data import build_dataset
from medpretrain.data.transforms import Compose, PairedRandomCrop, PairedRandomFlip
from medpretrain.metrics import bootstrap_images, mean_metrics, segmentation_metrics
from medpretrain.regimes import Classifier, apply_regime
from medpretrain.unet import UNet


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
