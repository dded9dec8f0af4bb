"""Frozen read-outs (medpretrain.probe): BN re-estimation against naive statistics, the linear probe against
scikit-learn, and the known answer of issue 14: a frozen *random* ResNet-18 with re-estimated BN is a good
feature extractor for PneumoniaMNIST (linear probe test AUC 0.88 at 10% labels, kNN 0.90), which the old
few-Adam-steps probe scored below chance.

Measured here (CPU, torch.manual_seed(0), resnet18 standard stem, 28 px, 388 training images): linear probe
C = 0.01 chosen on validation (val AUC 0.915), test AUC 0.879; kNN k = 200 (val 0.909), test AUC 0.904;
a run of finetune/run.py regime=linear takes ~10 s of CPU time (the feature pass dominates, the fits < 1 s).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import load_exact, load_state_dict
from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import build_dataset
from medpretrain.finetune import main_in_process
from medpretrain.knn import knn_scores
from medpretrain.metrics import classification_metrics
from medpretrain.probe import (
    C_GRID,
    Features,
    Standardiser,
    cache_features,
    check_regime,
    fit_linear_probe,
    fit_logistic,
    fold_standardisation,
    is_readout,
    knn_probabilities,
    knn_readout,
    reestimate_frozen_bn,
)
from medpretrain.regimes import Classifier, apply_regime, parse_regime

ROOT = Path(__file__).resolve().parent.parent
DATA = DataConfig(dataset="medmnist:pneumoniamnist", label_fraction=0.1)


def _auc_only(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return classification_metrics(probs, labels, "binary")


def _random_resnet(regime: str = "linear") -> Classifier:
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", 1, "standard"), 2)
    apply_regime(model, regime, lr=0.1)
    return model


@pytest.fixture(scope="module")
def pneumonia() -> dict:
    """Real PneumoniaMNIST at 10% labels; a frozen random ResNet-18 with BN re-estimated; cached features."""
    ds = {split: build_dataset(DATA, split) for split in ("train", "val", "test")}
    model = _random_resnet()
    assert torch.equal(model.backbone.bn1.running_mean, torch.zeros(64))  # the initial statistics
    n = reestimate_frozen_bn(model, ds["train"], "cpu", batch_size=97)  # 388 = 4 x 97: equal batches
    feats = {s: cache_features(model.backbone, d, "cpu") for s, d in ds.items()}
    return {"ds": ds, "model": model, "n_bn": n, "feats": feats}


# ------------------------------------------------------------------------------------------------
# BatchNorm re-estimation
# ------------------------------------------------------------------------------------------------


def test_bn_reestimation_gives_the_data_statistics(pneumonia):
    model, ds = pneumonia["model"], pneumonia["ds"]
    assert len(ds["train"]) == 388 and pneumonia["n_bn"] == 20  # every BN layer of a ResNet-18
    x = torch.stack([ds["train"][i]["image"] for i in range(len(ds["train"]))])
    with torch.no_grad():
        pre = model.backbone.conv1(x)  # what enters bn1: the first BN sees the data, nothing upstream normalises
    naive_mean = pre.mean((0, 2, 3))
    # momentum=None is a cumulative average over the 4 equal batches: the mean is the mean over all images,
    # the variance the average of the batch (unbiased) variances.
    naive_var = torch.stack([pre[i:i + 97].transpose(0, 1).flatten(1).var(1) for i in range(0, 388, 97)]).mean(0)
    bn1 = model.backbone.bn1
    torch.testing.assert_close(bn1.running_mean, naive_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn1.running_var, naive_var, rtol=1e-4, atol=1e-6)
    assert float(naive_mean.abs().max()) > 0.05  # the data's statistics are far from the initial (0, 1)
    assert float((naive_var - 1).abs().max()) > 0.05
    assert int(bn1.num_batches_tracked) == 4 and bn1.momentum == 0.1 and not bn1.training

    # Every layer: in eval mode, what enters each BN over the training images has (nearly) the mean and variance
    # the layer stores (exact for bn1; deeper ones differ because the pass normalised upstream with batch
    # statistics; measured: mean within 0.09 standard deviations, variance ratio median 0.97-1.0).
    seen: dict[str, torch.Tensor] = {}
    bns = {n: m for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, inp[0])) for n, m in bns.items()]
    with torch.no_grad():
        model.backbone.eval()(x)
    for h in hooks:
        h.remove()
    for name, bn in bns.items():
        data_mean, data_var = seen[name].mean((0, 2, 3)), seen[name].transpose(0, 1).flatten(1).var(1)
        assert float(((bn.running_mean - data_mean).abs() / data_var.sqrt()).max()) < 0.15, name
        assert 0.95 < float((bn.running_var / data_var).median()) < 1.01, name


def test_bn_reestimation_touches_only_frozen_layers_and_no_rng(pneumonia):
    model = _random_resnet("freeze:1")  # the stem only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    info = type("Info", (), {"bn_reestimated": False})()
    n = reestimate_frozen_bn(model, pneumonia["ds"]["train"], "cpu", batch_size=128, regime_info=info)
    assert n == 1 and info.bn_reestimated
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's random stream is untouched
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"backbone.bn1.running_mean", "backbone.bn1.running_var", "backbone.bn1.num_batches_tracked"}
    # Nothing frozen, nothing re-estimated (full, reinit, freeze:0).
    full = _random_resnet("full")
    state = {k: v.clone() for k, v in full.state_dict().items()}
    assert reestimate_frozen_bn(full, pneumonia["ds"]["train"], "cpu", regime_info=info) == 0
    assert not info.bn_reestimated
    assert all(torch.equal(state[k], v) for k, v in full.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Linear probe and kNN on real data: the known answer
# ------------------------------------------------------------------------------------------------


def test_linear_probe_of_random_resnet_known_answer(pneumonia):
    f = pneumonia["feats"]
    fit = fit_linear_probe(f["train"], f["val"], "binary", 2, _auc_only)
    assert fit.head is not None and fit.converged and 0 < fit.iterations < 200
    test_auc = roc_auc_score(f["test"].labels, torch.softmax(fit.head.logits(f["test"].x), 1)[:, 1].numpy())
    assert test_auc > 0.8  # the acceptance bar; measured 0.879 (C = 0.01)
    assert test_auc == pytest.approx(0.879, abs=0.03)
    assert fit.choice["C"] == pytest.approx(0.01)

    # The chosen C is the validation arg-max, recomputed with scikit-learn's own probabilities.
    std = Standardiser.fit(f["train"].x)
    z_train, z_val = std(f["train"].x).numpy(), std(f["val"].x).numpy()
    sk_val = []
    for C in C_GRID:
        clf = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(z_train, f["train"].labels)
        sk_val.append(roc_auc_score(f["val"].labels, clf.predict_proba(z_val)[:, 1]))
    assert fit.choice["C"] == pytest.approx(C_GRID[int(np.argmax(sk_val))])
    assert [c["val_auc"] for c in fit.candidates] == pytest.approx(sk_val, abs=2e-3)
    assert [c["C"] for c in fit.candidates] == pytest.approx(list(C_GRID))


def test_knn_readout_known_answer(pneumonia):
    f = pneumonia["feats"]
    fit = knn_readout(f["train"], f["val"], "binary", 2, _auc_only)
    assert [c["k"] for c in fit.candidates] == [20, 200]
    assert fit.choice["k"] == [20, 200][int(np.argmax([c["val_auc"] for c in fit.candidates]))]
    p = knn_probabilities(f["train"], f["test"], "binary", 2, fit.choice["k"])
    test_auc = roc_auc_score(f["test"].labels, p)
    assert test_auc > 0.5 and test_auc == pytest.approx(0.904, abs=0.03)  # measured 0.904 (k = 200)
    # A bank smaller than k: k is clipped, duplicates dropped.
    pick = np.concatenate([np.flatnonzero(f["train"].labels == 0)[:10], np.flatnonzero(f["train"].labels == 1)[:20]])
    small = Features(f["train"].x[pick], f["train"].labels[pick], f["train"].index[pick])
    assert [c["k"] for c in knn_readout(small, f["val"], "binary", 2, _auc_only).candidates] == [20, 30]


# ------------------------------------------------------------------------------------------------
# The pieces, against naive references
# ------------------------------------------------------------------------------------------------


def _toy(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = 2 * torch.randn(classes, d, generator=g)
    x = (centres[y] + torch.randn(n, d, generator=g)) * torch.linspace(0.01, 100, d) + 5  # wildly unequal scales
    return x.float(), y.numpy()


def test_standardiser_and_fold_reproduce_sklearn():
    x, y = _toy(120, 7, 2)
    x[:, 3] = 4.0  # a constant feature keeps scale 1
    std = Standardiser.fit(x)
    z = std(x)
    torch.testing.assert_close(z[:, [0, 1, 2, 4, 5, 6]].mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z[:, [0, 1, 2, 4, 5, 6]].std(0, unbiased=False), torch.ones(6, dtype=torch.float64))
    assert float(std.scale[3]) == 1.0 and float(z[:, 3].abs().max()) == 0.0
    w, b, n_iter, ok = fit_logistic(z, y, "binary", 2, C=0.5)
    assert ok and n_iter > 0 and torch.equal(w[0], -w[1]) and float(b[0]) == -float(b[1])
    clf = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(z.numpy(), y)
    head = fold_standardisation(w, b, std)
    p = torch.softmax(head.logits(x), 1)[:, 1].numpy()
    np.testing.assert_allclose(p, clf.predict_proba(z.numpy())[:, 1], atol=1e-4)


def test_fit_logistic_multiclass_absent_class_and_multilabel_constant_label():
    x, y = _toy(150, 5, 3)
    y[y == 1] = 2  # class 1 never seen in training
    z = Standardiser.fit(x)(x)  # the probe always fits on standardised features
    w, b, _, _ = fit_logistic(z, y, "multiclass", 4, C=1.0)
    assert w.shape == (4, 5) and torch.all(w[[1, 3]] == 0) and float(b[1]) == float(b[3]) == -1e4
    p = torch.softmax(z @ w.T + b, 1)
    assert float(p[:, [1, 3]].max()) == 0.0
    clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(z.numpy(), y)  # two classes: binary model
    np.testing.assert_allclose(p[:, 2].numpy(), clf.predict_proba(z.numpy())[:, 1], atol=1e-4)

    x3, y3 = _toy(150, 5, 3, seed=1)
    z3 = Standardiser.fit(x3)(x3)
    w3, b3, _, _ = fit_logistic(z3, y3, "multiclass", 3, C=1.0)
    clf3 = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(z3.numpy(), y3)  # multinomial
    np.testing.assert_allclose(torch.softmax(z3 @ w3.T + b3, 1).numpy(), clf3.predict_proba(z3.numpy()), atol=1e-4)

    labels = np.stack([y3 == 0, y3 == 2, np.zeros_like(y3, dtype=bool)], 1).astype(np.int64)
    wl, bl, _, _ = fit_logistic(z3, labels, "multilabel", 3, C=1.0)
    assert torch.all(wl[2] == 0) and float(torch.sigmoid(bl[2])) == pytest.approx(1e-4)
    one = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(z3.numpy(), labels[:, 1])
    np.testing.assert_allclose(torch.sigmoid(z3 @ wl[1] + bl[1]).numpy(), one.predict_proba(z3.numpy())[:, 1],
                               atol=1e-4)
    with pytest.raises(ConfigError, match="two classes among the training labels"):
        fit_logistic(torch.zeros(5, 2, dtype=torch.float64), np.ones(5, dtype=np.int64), "binary", 2, C=1.0)


def test_knn_probabilities_multilabel_and_multiclass_shares():
    x, y = _toy(60, 4, 3)
    bank = Features(x[:40], y[:40], np.arange(40))
    query = Features(x[40:], y[40:], np.arange(20))
    p = knn_probabilities(bank, query, "multiclass", 3, k=7)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    multi = Features(x[:40], np.eye(3, dtype=np.int64)[y[:40]], np.arange(40))
    np.testing.assert_allclose(knn_probabilities(multi, query, "multilabel", 3, k=7), p, atol=1e-6)  # one-hot = shares
    assert knn_probabilities(Features(x[:40], (y[:40] > 0).astype(np.int64), np.arange(40)), query, "binary", 2,
                             k=7).shape == (20,)
    torch.testing.assert_close(torch.from_numpy(p), knn_scores(query.x, bank.x, torch.as_tensor(y[:40]), 3, k=7))


def test_regime_checks():
    assert is_readout("classification", parse_regime("linear")) and is_readout("classification", parse_regime("knn"))
    assert not is_readout("segmentation", parse_regime("linear"))  # a frozen encoder under a trained decoder
    assert not is_readout("classification", parse_regime("freeze:5"))
    assert check_regime("classification", "knn:200").k == 200
    with pytest.raises(ConfigError, match=r"^regime=knn is a classification read-out; task=segmentation has none"):
        check_regime("segmentation", "knn")


# ------------------------------------------------------------------------------------------------
# finetune/run.py end to end
# ------------------------------------------------------------------------------------------------


def test_finetune_linear_end_to_end_writes_a_reproducible_probe(tmp_path):
    out = tmp_path / "lin"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), "backbone.stem=standard", "regime=linear",
                            "data.label_fraction=0.1", f"output_dir={out}", "n_bootstrap=100"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["regime"] == "linear"
    info = res["regime_info"]
    assert info["bn_reestimated"] is True and info["trainable_params"] == 512 * 2 + 2
    ro = info["readout"]
    assert ro["kind"] == "linear" and ro["converged"] and ro["standardised"]
    scores = [c["val_auc"] for c in ro["candidates"]]
    assert ro["C"] == ro["candidates"][int(np.argmax(scores))]["C"] and res["metrics"]["val_best"]["auc"] == max(scores)
    assert res["best_epoch"] == res["epochs_run"] == 1 and res["optimizer_steps"] == ro["iterations"]
    assert res["data"]["train_size"] == 388

    pred = np.load(out / "predictions.npz")
    auc = res["metrics"]["test"]["auc"]
    assert auc == pytest.approx(roc_auc_score(pred["test_labels"], pred["test_probs"]), abs=1e-5)
    assert auc > 0.8 and auc == pytest.approx(0.879, abs=0.03)
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    assert len(rows) == 1 and float(rows[0]["val_auc"]) == pytest.approx(max(scores), abs=1e-5)

    # The saved Classifier (backbone with re-estimated BN + folded head) reproduces the probe's probabilities.
    state, meta = load_state_dict(out / "model.safetensors")
    assert meta["readout"] == "linear" and meta["C"] == ro["C"]
    model = Classifier(build_backbone("resnet18", 1, "standard"), 2)
    load_exact(model, state, source=out / "model.safetensors")
    test = build_dataset(DataConfig(dataset="medmnist:pneumoniamnist"), "test")
    x = torch.stack([test[int(i)]["image"] for i in pred["test_index"]])
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), 1)[:, 1].numpy()
    np.testing.assert_allclose(p, pred["test_probs"], atol=1e-5)


def test_finetune_knn_end_to_end(tmp_path):
    out = tmp_path / "knn"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), "backbone.arch=cbr_tiny", "regime=knn",
                            "data.label_fraction=0.05", f"output_dir={out}", "n_bootstrap=100"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    ro = res["regime_info"]["readout"]
    assert ro["kind"] == "knn" and [c["k"] for c in ro["candidates"]] == [20, 194] and ro["bank_size"] == 194
    assert ro["k"] == ro["candidates"][int(np.argmax([c["val_auc"] for c in ro["candidates"]]))]["k"]
    assert res["regime_info"]["trainable_params"] == 0 and res["optimizer_steps"] == 0
    assert res["metrics"]["test"]["auc"] > 0.5
    # The saved bank and backbone reproduce the test probabilities.
    bank, meta = load_state_dict(out / "knn_bank.safetensors")
    state, _ = load_state_dict(out / "model.safetensors")
    model = Classifier(build_backbone("cbr_tiny", 1, "small"), 2)
    load_exact(model, state, source=out / "model.safetensors")
    pred = np.load(out / "predictions.npz")
    test = build_dataset(DataConfig(dataset="medmnist:pneumoniamnist"), "test")
    with torch.no_grad():
        q = model.backbone.eval()(torch.stack([test[int(i)]["image"] for i in pred["test_index"]]))
    p = knn_scores(q, bank["features"], bank["labels"], 2, k=meta["k"], t=meta["t"])[:, 1].numpy()
    np.testing.assert_allclose(p, pred["test_probs"], atol=1e-5)
