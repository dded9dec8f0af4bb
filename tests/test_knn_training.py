"""kNN monitor against a naive loop; training utilities: CSV, guard, checkpoint resolution, schedules, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medpretrain.faults import FiniteGuard, NonFiniteLossError
from medpretrain.knn import knn_accuracy, knn_predict
from medpretrain.resume import (
    COMPLETE_MARKER,
    BufferState,
    checkpoint_step,
    list_checkpoints,
    project_configuration,
    resolve_resume,
)
from medpretrain.runlog import CSVLogger, plot_curves
from medpretrain.schedules import warmup_cosine


def naive_knn(query, bank, labels, num_classes, k, t, exclude_self=False):
    q, b = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    out = []
    for i in range(len(q)):
        sims = [(float(q[i] @ b[j]), j) for j in range(len(b)) if not (exclude_self and i == j)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(labels[j])] += math.exp(s / t)
        out.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_matches_naive_loop(exclude_self):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(37, 6, generator=g)
    labels = torch.randint(0, 3, (37,), generator=g)
    query = bank if exclude_self else torch.randn(23, 6, generator=g)
    got = knn_predict(query, bank, labels, 3, k=5, t=0.1, exclude_self=exclude_self, chunk=7)
    assert torch.equal(got, naive_knn(query, bank, labels, 3, 5, 0.1, exclude_self))


def test_knn_accuracy_separable_and_random():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    y = torch.randint(0, 2, (200,), generator=g)
    x = centres[y] + 0.3 * torch.randn(200, 3, generator=g)
    assert knn_accuracy(x, y, k=20) == 1.0  # leave-one-out on clean clusters
    noise = torch.randn(200, 3, generator=g)
    assert 0.3 < knn_accuracy(noise, y, k=20) < 0.7
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(x, x, y, 2, k=0)


def test_csv_logger_truncates_after_resume_step(tmp_path):
    log = CSVLogger(tmp_path / "m.csv", ["step", "loss", "knn_acc"])
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    log.log({"step": 5, "knn_acc": 0.9})
    assert CSVLogger(tmp_path / "m.csv").truncate_after(3) == 3
    rows = CSVLogger(tmp_path / "m.csv").rows()
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["loss"] == "0.5"
    with pytest.raises(ValueError, match="not in the header"):
        log.log({"step": 4, "other": 1})


def test_finite_guard_names_first_bad_step():
    guard = FiniteGuard()
    guard.update(torch.tensor(1.0), 1)
    guard.check("ckpt")
    guard.update(torch.tensor(float("nan")), 2)
    guard.update(torch.tensor(float("inf")), 3)
    with pytest.raises(NonFiniteLossError, match="at step 2.*last good checkpoint: ckpt_0") as err:
        guard.check("ckpt_0")
    assert err.value.step == 2
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        guard.check(None, reduce=lambda t: t.max())


def test_resume_resolution_skips_incomplete_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    for i, complete in ((0, True), (1, True), (2, False), (10, True), (11, False)):
        (d / f"checkpoint_{i}").mkdir(parents=True)
        if complete:
            (d / f"checkpoint_{i}" / COMPLETE_MARKER).write_text(json.dumps({"step": i * 5}))
    assert [p.name for p in list_checkpoints(d)] == ["checkpoint_0", "checkpoint_1", "checkpoint_10"]
    assert resolve_resume("auto", d).name == "checkpoint_10"  # numeric, not lexical, order
    assert checkpoint_step(resolve_resume("auto", d)) == 50
    assert resolve_resume("", d) is None and resolve_resume("none", d) is None
    assert resolve_resume("auto", tmp_path / "missing") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(d / "checkpoint_11"), d)
    with pytest.raises(ValueError, match="total_limit must be >= 2"):
        project_configuration(tmp_path, total_limit=1)


def test_buffer_state_round_trip():
    from lightly.loss import NTXentLoss

    a = NTXentLoss(memory_bank_size=(8, 4))
    b = NTXentLoss(memory_bank_size=(8, 4))
    a.memory_bank.bank_ptr[0] = 3
    state = BufferState(a.memory_bank, ["bank", "bank_ptr"]).state_dict()
    BufferState(b.memory_bank, ["bank", "bank_ptr"]).load_state_dict(state)
    assert torch.equal(a.memory_bank.bank, b.memory_bank.bank) and int(b.memory_bank.bank_ptr) == 3
    assert a.memory_bank.state_dict() == {} or "bank" not in a.memory_bank.state_dict()  # why BufferState exists


def test_warmup_cosine_and_plot(tmp_path):
    assert warmup_cosine(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, warmup=10) == pytest.approx(0.0)
    log = CSVLogger(tmp_path / "m.csv", ["step", "loss", "knn_acc"])
    for s in range(1, 4):
        log.log({"step": s, "loss": 2.0 - s * 0.1})
    log.log({"step": 3, "knn_acc": 0.8})
    png = plot_curves(tmp_path / "m.csv", tmp_path / "loss.png", ("loss", "knn_acc"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the columns"):
        plot_curves(tmp_path / "m.csv", tmp_path / "x.png", ("missing",))


# kNN read-out probabilities and the monitor's report (issue 14: monitors that inform).


def naive_scores(query, bank, targets, num_classes, k, t):
    """Each class's share of the summed exp(sim / t) weight of the k nearest bank samples (multi-hot: per label)."""
    q, b = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    out = []
    for i in range(len(q)):
        sims = sorted(((float(q[i] @ b[j]), j) for j in range(len(b))), key=lambda s: -s[0])[:k]
        total = sum(math.exp(s / t) for s, _ in sims)
        row = [0.0] * num_classes
        for s, j in sims:
            labels = [int(targets[j])] if targets.ndim == 1 else [c for c in range(num_classes) if targets[j, c] > 0]
            for c in labels:
                row[c] += math.exp(s / t) / total
        out.append(row)
    return torch.tensor(out)


def test_knn_scores_are_vote_shares():
    from medpretrain.knn import knn_scores

    g = torch.Generator().manual_seed(3)
    bank, query = torch.randn(41, 5, generator=g), torch.randn(13, 5, generator=g)
    labels = torch.randint(0, 3, (41,), generator=g)
    p = knn_scores(query, bank, labels, 3, k=6, t=0.2, chunk=4)
    torch.testing.assert_close(p, naive_scores(query, bank, labels, 3, 6, 0.2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.sum(1), torch.ones(13))
    assert torch.equal(p.argmax(1), knn_predict(query, bank, labels, 3, k=6, t=0.2))
    multi = (torch.rand(41, 3, generator=g) > 0.5).float()
    torch.testing.assert_close(knn_scores(query, bank, multi, 3, k=6, t=0.2),
                               naive_scores(query, bank, multi, 3, 6, 0.2), rtol=1e-5, atol=1e-6)
    assert knn_scores(query, bank, labels, 3, k=500).shape == (13, 3)  # k clipped to the bank
    with pytest.raises(ValueError, match=r"bank targets must be \[N\] or \[N, 3\]"):
        knn_scores(query, bank, multi[:, :2], 3)


def test_knn_report_against_naive_numbers():
    from sklearn.metrics import roc_auc_score

    from medpretrain.knn import knn_report, knn_scores

    g = torch.Generator().manual_seed(4)
    y = (torch.rand(300, generator=g) < 0.75).long()  # 3:1 prior, like PneumoniaMNIST's validation split
    x = torch.randn(300, 8, generator=g) + 0.8 * y[:, None]
    r = knn_report(x, y, k=20)
    pred = knn_predict(x, x, y, 2, k=20, exclude_self=True)
    assert r["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    recall = [float((pred[y == c] == c).float().mean()) for c in (0, 1)]
    assert r["balanced_accuracy"] == pytest.approx(sum(recall) / 2)
    assert r["majority_baseline"] == pytest.approx(float((y == 1).float().mean()))
    scores = knn_scores(x, x, y, 2, k=20, exclude_self=True)[:, 1]
    assert r["auc"] == pytest.approx(roc_auc_score(y.numpy(), scores.numpy()), abs=1e-5)
    # Noise features: plain accuracy sits near the majority baseline, balanced accuracy and AUC near chance.
    noise = knn_report(torch.randn(300, 8, generator=g), y, k=20)
    assert abs(noise["balanced_accuracy"] - 0.5) < 0.1 and abs(noise["auc"] - 0.5) < 0.1
    assert noise["accuracy"] > 0.6


def test_knn_monitor_reports_balanced_accuracy_and_majority(monkeypatch):
    from medpretrain.backbones import build_backbone
    from medpretrain.config import DataConfig
    from medpretrain.knn import KNNMonitor

    monitor = KNNMonitor(DataConfig(dataset="medmnist:pneumoniamnist"), "val", k=20, t=0.07)
    assert monitor.last == {} and monitor.columns() == {}
    torch.manual_seed(0)
    acc = monitor(build_backbone("cbr_tiny", 1, "small"), torch.device("cpu"))
    last = monitor.last
    assert acc == last["accuracy"] and set(last) == {"accuracy", "balanced_accuracy", "auc", "majority_baseline"}
    assert last["majority_baseline"] == pytest.approx(389 / 524)  # 0.742: PneumoniaMNIST's validation prior
    assert 0.0 < last["balanced_accuracy"] < 1.0 and 0.5 < last["auc"] <= 1.0
    assert monitor.columns() == {"knn_balanced_acc": last["balanced_accuracy"], "knn_auc": last["auc"],
                                 "knn_majority": last["majority_baseline"]}
    assert tuple(monitor.columns()) == KNNMonitor.REPORT_COLUMNS
