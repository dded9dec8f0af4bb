"""Transfusion-style analyses (issue 18): per-stage weight change and linear CKA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from medpretrain.backbones import build_backbone
from medpretrain.transfer import linear_cka, reuse_analysis, snapshot, stage_outputs, weight_change


def test_linear_cka_is_one_for_itself_and_rotations_and_near_zero_for_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))  # an orthogonal rotation
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.0 * x + 5.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scale, shift
    noise = torch.randn(200, 30, generator=g)
    assert linear_cka(x, noise) < 0.2  # independent: E[CKA] ~ p / n here
    half = torch.cat([x[:, :15], noise[:, :15]], 1)
    assert 0.3 < linear_cka(x, half) < 0.8  # half of the signal kept
    assert linear_cka(x, torch.ones(200, 4)) == 0.0  # a constant representation
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, x[:10])


def test_weight_change_is_zero_for_an_untouched_stage_and_positive_for_a_trained_one() -> None:
    torch.manual_seed(0)
    net = build_backbone("cbr_tiny", in_channels=1)
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    first, *rest = list(net.blocks.children())
    for p in first.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 1, 28, 28)).pow(2).mean().backward()
        opt.step()
    change = weight_change(start, net)
    assert len(change) == len(list(net.blocks.children()))
    assert change[0] == 0.0 and all(c > 0 for c in change[1:])
    # the definition: ||w - w0|| / ||w0|| over the stage's parameters
    params = [k for k in start if k.startswith("blocks.1.")]
    expect = math.sqrt(sum(float((dict(net.named_parameters())[k].detach() - start[k]).pow(2).sum()) for k in params)
                       / sum(float(start[k].pow(2).sum()) for k in params))
    assert change[1] == pytest.approx(expect, rel=1e-6)


def test_reuse_analysis_of_an_unchanged_network_is_all_ones_and_zeros() -> None:
    torch.manual_seed(0)
    net = build_backbone("cbr_tiny", in_channels=1)
    before = snapshot(net)
    images = torch.randn(16, 1, 28, 28)
    same = reuse_analysis(before, net, images)
    assert same["weight_change"] == [0.0] * len(same["stages"])
    assert same["cka"] == pytest.approx([1.0] * len(same["stages"]), abs=1e-9)
    with torch.no_grad():
        net.blocks[-1].conv.weight.add_(torch.randn_like(net.blocks[-1].conv.weight))  # perturb the top stage
    moved = reuse_analysis(before, net, images)
    assert moved["weight_change"][-1] > 0.5 and moved["weight_change"][:-1] == [0.0] * (len(moved["stages"]) - 1)
    assert moved["cka"][-1] < 0.99 and moved["cka"][0] == pytest.approx(1.0, abs=1e-9)
    assert net.training  # stage_outputs restores the mode
    outs = stage_outputs(net, images)
    assert [o.shape[0] for o in outs] == [16] * len(outs)


def test_stage_outputs_follow_the_regime_stage_names_of_a_resnet() -> None:
    net = build_backbone("resnet18", in_channels=1)
    outs = stage_outputs(net, torch.randn(4, 1, 32, 32))
    assert [o.shape[1] for o in outs] == [64, 64, 128, 256, 512]  # conv1+bn1, layer1..layer4
    assert isinstance(net, nn.Module)


def test_a_fine_tuning_run_records_feature_reuse_and_convergence(tmp_path) -> None:
    """freeze:1 on real PneumoniaMNIST: the frozen stage did not move (weight change 0, CKA 1), the trained ones
    did; steps / seconds to 95% of the best validation AUC come from the run's own history."""
    from pathlib import Path

    from medpretrain.finetune import main_in_process
    from medpretrain.results import read_results

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    assert main_in_process(["--config", str(root / "configs/finetune.yaml"), "backbone.arch=cbr_tiny",
                            "regime=freeze:1", "optim.steps=6", "optim.eval_every=2", "optim.batch_size=16",
                            "data.label_fraction=0.05", "eval.reuse_images=24", "n_bootstrap=20",
                            f"output_dir={out}"]) == 0
    res = read_results(out / "results.json")
    t = res.transfer
    assert t is not None and t["n_images"] == 24 and len(t["stages"]) == len(t["weight_change"]) == len(t["cka"])
    assert t["weight_change"][0] == 0.0 and t["cka"][0] == pytest.approx(1.0, abs=1e-9)
    assert all(w > 0 for w in t["weight_change"][1:]) and all(c < 1.0 - 1e-6 for c in t["cka"][1:])
    assert res.history is not None and res.epochs_to_95 is not None
    assert res.steps_to_95 == res.history[res.epochs_to_95 - 1]["step"] == 2 * res.epochs_to_95
    assert res.seconds_to_95 == pytest.approx(sum(h["epoch_s"] for h in res.history[:res.epochs_to_95]))


def _fine_tuned_model(path, arch: str = "cbr_tiny", in_channels: int = 1) -> dict:
    """A model.safetensors as finetune/run.py writes it (backbone + head, with its meta)."""
    from medpretrain.checkpoint import save_state_dict
    from medpretrain.regimes import Classifier

    torch.manual_seed(3)
    model = Classifier(build_backbone(arch, in_channels=in_channels), 3)
    save_state_dict(path / "model.safetensors", model.state_dict(),
                    {"arch": arch, "stem": "standard", "in_channels": in_channels, "task": "multiclass",
                     "init": "scratch", "config": {"data": {"dataset": "folder:busi"}}})
    return {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def test_supervised_init_loads_the_backbone_of_a_fine_tuned_model_exactly(tmp_path) -> None:
    from medpretrain.checkpoint import CheckpointError
    from medpretrain.finetune import init_label
    from medpretrain.init import init_backbone

    run = tmp_path / "busi" / "seed0"
    run.mkdir(parents=True)
    expect = _fine_tuned_model(run)
    for spec in (f"supervised:{run}", f"supervised:{run / 'model.safetensors'}"):
        backbone, info = init_backbone(spec, "cbr_tiny", 1, "standard", image_size=28)
        got = backbone.state_dict()
        assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)
        assert info.name == "supervised" and "folder:busi" in info.notes[0]
        assert init_label(spec) == "supervised-busi-seed0"
    with pytest.raises(CheckpointError, match="arch 'cbr_tiny'"):
        init_backbone(f"supervised:{run}", "resnet18", 1, "standard", image_size=28)
    with pytest.raises(CheckpointError, match="in_channels=1"):
        init_backbone(f"supervised:{run}", "cbr_tiny", 3, "standard", image_size=28)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        init_backbone(f"supervised:{tmp_path / 'nothing'}", "cbr_tiny", 1, "standard", image_size=28)


def test_supervised_init_fine_tunes_on_another_set(tmp_path) -> None:
    """Cross-domain: a BUSI-shaped classifier's backbone starts a PneumoniaMNIST run (2 classes, new head)."""
    from pathlib import Path

    from medpretrain.finetune import main_in_process
    from medpretrain.results import read_results

    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "source"
    src.mkdir()
    _fine_tuned_model(src)
    out = tmp_path / "run"
    assert main_in_process(["--config", str(root / "configs/finetune.yaml"), "backbone.arch=cbr_tiny",
                            "backbone.stem=standard", f"init=supervised:{src}", "regime=full", "optim.steps=2",
                            "optim.eval_every=2", "data.label_fraction=0.02", "n_bootstrap=10",
                            f"output_dir={out}"]) == 0
    res = read_results(out / "results.json")
    assert res.status == "complete" and res.init_label == f"supervised-{tmp_path.name}-source"
    assert res.init_info is not None and res.init_info["name"] == "supervised"
