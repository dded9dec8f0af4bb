"""Transfer regimes: frozen parts really do not change (weights and BN statistics), re-init is exact."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medpretrain.backbones import build_backbone
from medpretrain.regimes import Classifier, Regime, apply_regime, backbone_stages, parse_regime
from medpretrain.utils import default_data_root


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A few real PneumoniaMNIST images (both classes) scaled to [-1, 1]."""
    npz = np.load(default_data_root() / "pneumoniamnist" / "pneumoniamnist_28.npz")
    y = npz["train_labels"].reshape(-1)
    idx = np.concatenate([np.nonzero(y == 0)[0][: n // 2], np.nonzero(y == 1)[0][: n // 2]])
    x = torch.from_numpy(npz["train_images"][idx].astype(np.float32) / 127.5 - 1).unsqueeze(1)
    return x, torch.from_numpy(y[idx].astype(np.int64))


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_backbone("resnet18", 1, "small"), 2, dropout=0.2)


def _train_steps(model: Classifier, groups, steps: int = 2) -> None:
    x, y = _batch()
    opt = torch.optim.SGD(groups, lr=0.1)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_parse_regime():
    assert str(parse_regime("freeze:3")) == "freeze:3" and parse_regime("linear").k is None
    for bad in ("freeze", "reinit:-1", "finetune", "linear:2"):
        with pytest.raises(ValueError, match="unknown regime"):
            parse_regime(bad)


def test_resnet_stages_from_stem_up():
    assert backbone_stages(build_backbone("resnet18", 1, "small")) == [
        ["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]
    ]
    assert backbone_stages(build_backbone("cbr_tiny", 1)) == [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"]]


def test_linear_probe_backbone_frozen_including_bn_stats():
    model = _model()
    groups, info = apply_regime(model, "linear", lr=0.1)
    before = _snapshot(model)
    _train_steps(model, groups)
    after = _snapshot(model)
    # Every backbone tensor (weights, BN running mean/var and the batch counter) is bit-identical.
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.")), "backbone moved"
    assert _changed(before, after, "head.")
    assert not model.backbone.bn1.training and model.dropout.training
    assert info.trainable_params == 512 * 2 + 2
    assert sum(p.numel() for g in groups for p in g["params"]) == info.trainable_params


def test_freeze_k_freezes_exactly_the_first_k_stages():
    model = _model()
    groups, info = apply_regime(model, "freeze:2", lr=0.1)
    assert info.frozen_stages == [0, 1]
    before = _snapshot(model)
    _train_steps(model, groups)
    after = _snapshot(model)
    for frozen in ("backbone.conv1.", "backbone.bn1.", "backbone.layer1."):
        assert not _changed(before, after, frozen), frozen
    for trained in ("backbone.layer2.", "backbone.layer4.", "head."):
        assert _changed(before, after, trained), trained
    assert model.backbone.layer2.training and not model.backbone.layer1.training


def test_reinit_keeps_lower_stages_and_matches_fresh_init():
    model = _model(seed=0)
    pretrained = _snapshot(model.backbone)
    torch.manual_seed(123)
    fresh = build_backbone("resnet18", 1, "small")
    groups, info = apply_regime(model, "reinit:2", lr=0.1, backbone_lr_mult=0.1, fresh_backbone=fresh)
    assert info.reinit_stages == [2, 3, 4]
    now = model.backbone.state_dict()
    for k in pretrained:
        if k.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(now[k], pretrained[k]), k
        elif k.startswith(("layer2.", "layer3.", "layer4.")):
            assert torch.equal(now[k], fresh.state_dict()[k]), k
    # Kept pre-trained stages get the lower learning rate, re-initialised ones the full one.
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.backbone.conv1.weight)] == pytest.approx(0.01)
    assert lr_of[id(model.backbone.layer1[0].conv1.weight)] == pytest.approx(0.01)
    assert lr_of[id(model.backbone.layer3[0].conv1.weight)] == pytest.approx(0.1)
    assert lr_of[id(model.head.weight)] == pytest.approx(0.1)


def test_reinit_without_fresh_backbone_resets_parameters():
    model = _model()
    before = _snapshot(model.backbone)
    apply_regime(model, "reinit:4", lr=0.1)
    after = model.backbone.state_dict()
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])


def test_full_param_groups_lr_and_weight_decay():
    model = _model()
    groups, info = apply_regime(model, "full", lr=1e-3, backbone_lr_mult=0.1, weight_decay=1e-4)
    assert info.frozen_params == 0
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.backbone.layer2[0].conv1.weight)]["lr"] == pytest.approx(1e-4)
    assert by_id[id(model.backbone.layer2[0].conv1.weight)]["weight_decay"] == pytest.approx(1e-4)
    assert by_id[id(model.backbone.bn1.weight)]["weight_decay"] == 0.0  # no decay on norms and biases
    assert by_id[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    # From scratch there is nothing to protect: the multiplier is ignored.
    groups2, info2 = apply_regime(_model(), "full", lr=1e-3, backbone_lr_mult=0.1, pretrained=False)
    assert {g["lr"] for g in groups2} == {1e-3} and info2.backbone_lr == pytest.approx(1e-3)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k must be between 0 and 5"):
        apply_regime(_model(), "freeze:6", lr=0.1)


# Mutation-testing gaps (benchmarks/results/mutation.md): each test below kills mutants that survived.


class _Declared(torch.nn.Module):
    """A backbone that declares its stages (one as a bare name) and has a module outside every stage."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 3, 1)
        self.norm = torch.nn.BatchNorm2d(3)
        self.body = torch.nn.Conv2d(3, 3, 1)
        self.extra = torch.nn.BatchNorm2d(3)  # in no stage
        self.stages = [["stem", "norm"], "body"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.body(self.norm(self.stem(x)))).mean((2, 3))


class _Plain(torch.nn.Module):
    """No ``arch`` and no declared stages: the children with parameters are the stages."""

    num_features = 2

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, 2)
        self.act = torch.nn.ReLU()
        self.second = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.first(x)))


def test_declared_and_fallback_stages():
    assert backbone_stages(_Declared()) == [["stem", "norm"], ["body"]]
    assert backbone_stages(_Plain()) == [["first"], ["second"]]


def test_regime_str_and_regime_object_accepted():
    assert str(Regime("full")) == "full" and str(parse_regime(" linear ")) == "linear"
    assert str(Regime("reinit", 0)) == "reinit:0"
    _, info = apply_regime(_model(), Regime("freeze", 1), lr=0.1)
    assert info.regime == "freeze:1" and info.frozen_stages == [0]


def test_classifier_defaults_and_validation():
    b = build_backbone("cbr_tiny", 1)
    model = Classifier(b, 1)
    assert model.dropout.p == 0.0 and model.head.out_features == 1 and model.frozen == []
    assert model.train() is model and model.training  # nothing frozen yet
    assert Classifier(b, 2, dropout=0.0).dropout.p == 0.0
    with pytest.raises(ValueError, match=r"^num_outputs must be >= 1, got 0$"):
        Classifier(b, 0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {bad}$"):
            Classifier(b, 2, dropout=bad)


def test_linear_freezes_modules_outside_the_stages_too():
    model = Classifier(_Declared(), 2)
    groups, info = apply_regime(model, "linear", lr=0.1)
    assert info.frozen_stages == [0, 1] and info.reinit_stages == []
    assert model.frozen == ["stem", "norm", "body", "extra"]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.extra.training and model.head.training
    assert info.frozen_params == sum(p.numel() for p in model.backbone.parameters())
    assert info.trainable_params == 3 * 2 + 2


def test_freeze_and_reinit_at_the_bounds():
    _, none = apply_regime(_model(), "freeze:0", lr=0.1)
    assert none.frozen_stages == [] and none.frozen_params == 0
    model = _model()
    _, every = apply_regime(model, "freeze:5", lr=0.1)
    assert every.frozen_stages == [0, 1, 2, 3, 4]
    assert every.trainable_params == 512 * 2 + 2
    model = _model()
    before = _snapshot(model.backbone)
    _, all_new = apply_regime(model, "reinit:0", lr=0.1)
    assert all_new.reinit_stages == [0, 1, 2, 3, 4]
    assert not torch.equal(before["conv1.weight"], model.backbone.state_dict()["conv1.weight"])
    with pytest.raises(ValueError, match=r"^regime reinit:6: k must be between 0 and 5 \(stages: \[\['conv1', "
                                         r"'bn1'\], \['layer1'\]"):
        apply_regime(_model(), "reinit:6", lr=0.1)


def test_default_lr_and_weight_decay_and_info():
    model = _model()
    groups, info = apply_regime(model, "full", lr=0.01)
    assert {g["lr"] for g in groups} == {0.01} and {g["weight_decay"] for g in groups} == {0.0}
    assert info.backbone_lr == 0.01 and info.head_lr == 0.01
    model = _model()
    groups, info = apply_regime(model, "freeze:2", lr=0.01, backbone_lr_mult=0.1, weight_decay=0.5)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.head.weight)]["weight_decay"] == 0.5  # a matrix: decayed
    assert by_id[id(model.head.bias)]["weight_decay"] == 0.0
    assert info.regime == "freeze:2" and info.stages == backbone_stages(model.backbone)
    assert info.backbone_lr == pytest.approx(0.001) and info.head_lr == 0.01
    frozen = sum(p.numel() for m in (model.backbone.conv1, model.backbone.bn1, model.backbone.layer1)
                 for p in m.parameters())
    assert info.frozen_params == frozen
    assert info.trainable_params == sum(p.numel() for p in model.parameters()) - frozen


# Frozen read-outs (issue 14): the knn regime and BatchNorm re-estimation of frozen layers.


def test_knn_regime_parsed_and_frozen_like_linear():
    from medpretrain.config import ConfigError

    assert parse_regime("knn") == Regime("knn") and parse_regime("knn:200") == Regime("knn", 200)
    assert str(parse_regime("knn:20")) == "knn:20"
    assert [Regime(k).frozen_readout for k in ("linear", "knn", "full")] == [True, True, False]
    assert not Regime("freeze", 5).frozen_readout
    for bad in ("knn:0", "knn:", "knn:x"):
        with pytest.raises(ConfigError, match=r"^unknown regime .*expected linear, knn, knn:<k>, full, freeze:<k> or "
                                              r"reinit:<k>$"):
            parse_regime(bad)
    model = _model()
    groups, info = apply_regime(model, "knn:200", lr=0.1)  # k counts neighbours, not stages: no range error
    assert model.frozen == [name for name, _ in model.backbone.named_children()]
    assert info.frozen_stages == [0, 1, 2, 3, 4] and not any(p.requires_grad for p in model.backbone.parameters())
    assert info.bn_reestimated is False and info.readout == {}


def test_reestimate_bn_of_frozen_stem_against_naive_statistics():
    from medpretrain.regimes import reestimate_bn

    x, _ = _batch(16)
    model = _model()
    apply_regime(model, "freeze:1", lr=0.1)
    model.train()
    assert reestimate_bn(model, [{"image": x[:8]}, {"image": x[8:]}, {"image": x[:1]}], "cpu") == 1
    with torch.no_grad():
        pre = model.backbone.conv1(x)  # [16, 64, 28, 28]: what enters bn1
    bn1 = model.backbone.bn1
    # Two equal batches (the one-image batch is skipped): the mean over all, the average of the batch variances.
    torch.testing.assert_close(bn1.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    batch_var = [p.transpose(0, 1).flatten(1).var(1) for p in (pre[:8], pre[8:])]
    torch.testing.assert_close(bn1.running_var, (batch_var[0] + batch_var[1]) / 2, rtol=1e-4, atol=1e-6)
    assert int(bn1.num_batches_tracked) == 2 and bn1.momentum == 0.1
    # Frozen stays eval, the rest keeps the model's mode; unfrozen BN layers keep their statistics.
    assert not bn1.training and model.training and model.backbone.layer1.training
    assert torch.equal(model.backbone.layer1[0].bn1.running_mean, torch.zeros(64))
    assert int(model.backbone.layer1[0].bn1.num_batches_tracked) == 0
    kept = bn1.running_mean.clone()
    with pytest.raises(ValueError, match="no batch of at least two images"):
        reestimate_bn(model, [{"image": x[:1]}], "cpu")
    assert torch.equal(bn1.running_mean, kept) and int(bn1.num_batches_tracked) == 2  # left as they were
    assert reestimate_bn(_model(), [{"image": x}], "cpu") == 0  # nothing frozen: nothing to do


# Mutation-testing gaps of the frozen read-outs (benchmarks/results/mutation.md, run at 22138fd).


def test_knn_with_one_neighbour_is_a_regime():
    assert parse_regime("knn:1") == Regime("knn", 1) and str(parse_regime(" knn:1 ")) == "knn:1"


def test_reestimate_bn_counts_every_frozen_layer_once():
    from medpretrain.regimes import reestimate_bn

    x, _ = _batch(8)
    model = _model()
    apply_regime(model, "freeze:2", lr=0.1)  # stem and layer1: bn1 and the two BN layers of each of two blocks
    model.frozen = [*model.frozen, "layer1.0"]  # a name inside a frozen one: its layers still count once
    assert reestimate_bn(model, [{"image": x}], "cpu") == 5
    frozen_bns = [model.backbone.bn1, *(m for m in model.backbone.layer1.modules()
                                        if isinstance(m, torch.nn.BatchNorm2d))]
    assert len(frozen_bns) == 5 and [int(m.num_batches_tracked) for m in frozen_bns] == [1] * 5
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in frozen_bns)
    assert int(model.backbone.layer2[0].bn1.num_batches_tracked) == 0  # trainable: untouched

    class Bare(torch.nn.Module):  # a model without a ``frozen`` list: nothing is frozen
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone("resnet18", 1, "small")

    bare = Bare()
    assert reestimate_bn(bare, [{"image": x}], "cpu") == 0
    assert int(bare.backbone.bn1.num_batches_tracked) == 0


def test_multitask_classifier_heads_forward_and_validation():
    from medpretrain.regimes import MultiTaskClassifier

    torch.manual_seed(0)
    b = build_backbone("cbr_tiny", 1)
    model = MultiTaskClassifier(b, {"pneumonia": 2, "effusion": 1, "site": 3})
    assert list(model.heads) == ["pneumonia", "effusion", "site"]  # the order of outputs
    assert [(h.in_features, h.out_features) for h in model.heads.values()] == [(b.num_features, n) for n in (2, 1, 3)]
    assert model.dropout.p == 0.0 and model.frozen == [] and model.backbone is b
    assert MultiTaskClassifier(b, {"a": 1}, dropout=0.3).dropout.p == 0.3
    x, _ = _batch(4)
    model.eval()
    out = model(x)
    assert list(out) == ["pneumonia", "effusion", "site"]
    z = b(x)
    for name, n in (("pneumonia", 2), ("effusion", 1), ("site", 3)):
        assert out[name].shape == (4, n)
        assert torch.equal(out[name], model.heads[name](z))
    for bad in ({}, {"a": 2, "b": 0}):
        with pytest.raises(ValueError, match=rf"^outputs must name at least one task, each with >= 1 output, "
                                             rf"got {re.escape(str(bad))}$"):
            MultiTaskClassifier(b, bad)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {bad}$"):
            MultiTaskClassifier(b, {"a": 2}, dropout=bad)
    # Frozen parts stay in eval mode through train(), as for Classifier.
    apply_regime(model, "linear", lr=0.1)
    model.train()
    assert model.frozen == [name for name, _ in b.named_children()] and model.training
    assert all(not m.training for name in model.frozen for m in b.get_submodule(name).modules())
    assert all(h.training for h in model.heads.values())
