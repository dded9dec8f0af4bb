"""finetune/run.py end to end on real data (PneumoniaMNIST, BUSI), tiny: cbr_tiny, a few steps per epoch.

Checks outputs and numbers: test metrics recomputed from the saved predictions, best-val selection,
a frozen backbone that really does not move (against the init checkpoint), resume, the unavailable
ImageNet arm, and stratified, reproducible label fractions.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, load_state_dict, save_backbone
from medpretrain.config import DataConfig
from medpretrain.data import build_dataset
from medpretrain.finetune import EXIT_UNAVAILABLE, main_in_process
from medpretrain.metrics import classification_metrics
from medpretrain.results import read_results

ROOT = Path(__file__).resolve().parent.parent

# optim.steps=0: the epoch protocol (the YAMLs budget 1000 steps), 2 steps per epoch
TINY = ["backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=2", "optim.max_steps_per_epoch=2", "optim.batch_size=32",
        "optim.eval_batch_size=512", "n_bootstrap=100"]


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_accelerate_launch_pneumonia_outputs_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/finetune.yaml"), *TINY, "data.label_fraction=0.05",
            f"output_dir={out}", "keep_checkpoints=true"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           str(ROOT / "finetune/run.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _read(out)
    assert res["status"] == "complete" and res["label_task"] == "binary"
    typed = read_results(out / "results.json")  # the one reader gives back what the one writer wrote
    assert json.dumps(typed.to_dict(), sort_keys=True) == json.dumps(res, sort_keys=True)
    assert res["schema_version"] == 1 and typed.headline == "auc" and typed.score == res["metrics"]["test"]["auc"]
    assert res["data"]["train_size"] == 194 and res["data"]["test_size"] == 624  # 5% of 3882, stratified
    assert res["data"]["train_class_counts"] == [19, 175]
    assert {"config.yaml", "metrics.csv", "model.safetensors", "predictions.npz"} <= {p.name for p in out.iterdir()}

    # The reported test metrics are those of the saved predictions, AUC equal to sklearn's.
    pred = np.load(out / "predictions.npz")
    assert pred["test_probs"].shape == (624,)
    again = classification_metrics(pred["test_probs"], pred["test_labels"], "binary", threshold=res["threshold"])
    assert again == pytest.approx(res["metrics"]["test"])
    assert res["metrics"]["test"]["auc"] == pytest.approx(roc_auc_score(pred["test_labels"], pred["test_probs"]), abs=1e-5)
    ci = res["ci"]["auc"]
    assert ci["low"] <= res["metrics"]["test"]["auc"] <= ci["high"]

    # Selection on validation: the selected epoch is the arg-max of the validation AUC.
    aucs = [h["val_auc"] for h in res["history"]]
    assert res["best_epoch"] == int(np.argmax(aucs)) + 1
    assert res["metrics"]["val_best"]["auc"] == pytest.approx(max(aucs))
    rows = _csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["epoch_s"]) > 0 for r in rows)
    state, meta = load_state_dict(out / "model.safetensors")
    assert meta["task"] == "binary" and "head.weight" in state and state["head.weight"].shape == (2, 128)

    # Resume: a third epoch continues from the epoch-2 checkpoint; epochs 1-2 are not re-run.
    proc = subprocess.run(cmd + ["optim.epochs=3", "resume=auto"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    res2 = _read(out)
    rows2 = _csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows2] == [1, 2, 3]
    assert rows2[:2] == rows  # the first two epochs are exactly the ones already logged
    assert [h["val_auc"] for h in res2["history"][:2]] == pytest.approx(aucs)
    assert res2["epochs_run"] == 3


def _selfsup_export(runs_dir: Path) -> Path:
    torch.manual_seed(7)
    backbone = build_backbone("cbr_tiny", 1, "small")
    # Non-trivial BN statistics, so that "they did not move" means something.
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = runs_dir / "pretrain" / "simclr" / "t" / "backbone.safetensors"
    meta = BackboneMeta(arch="cbr_tiny", in_channels=1, stem="small", image_size=28, mean=0.5, std=0.5,
                        method="simclr", dataset="medmnist:pneumoniamnist")
    save_backbone(path, backbone, meta)
    return path


def test_linear_probe_keeps_selfsup_backbone_bit_identical(tmp_path):
    export = _selfsup_export(tmp_path / "runs")
    out = tmp_path / "lin"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), *TINY, "init=selfsup",
                            "regime=linear", f"runs_dir={tmp_path / 'runs'}", "data.label_fraction=0.05",
                            f"output_dir={out}", "optim.lr=0.05"])
    assert code == 0
    res = _read(out)
    assert res["init_info"]["name"] == "simclr" and res["init_info"]["source"] == str(export)
    assert len(res["init_info"]["sha256"]) == 64
    trained, _ = load_state_dict(out / "model.safetensors")
    from medpretrain.checkpoint import load_backbone_state

    initial, _ = load_backbone_state(export)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k, v in initial.items():
        if not k.endswith(stats):
            assert torch.equal(trained[f"backbone.{k}"], v), k  # weights unchanged
    # BN statistics re-estimated on the 194 training images (one batch of 512), not the export's any more.
    assert not torch.equal(trained["backbone.blocks.0.bn.running_mean"], initial["blocks.0.bn.running_mean"])
    assert int(trained["backbone.blocks.0.bn.num_batches_tracked"]) == 1 and res["regime_info"]["bn_reestimated"]
    assert not torch.equal(trained["head.weight"], torch.zeros_like(trained["head.weight"]))
    assert res["regime_info"]["trainable_params"] == 128 * 2 + 2


def test_busi_three_class_run(tmp_path):
    out = tmp_path / "busi"
    code = main_in_process(["--config", str(ROOT / "configs/finetune_busi.yaml"), *TINY, "data.image_size=32",
                            "regime=freeze:2", "optim.patience=1", f"output_dir={out}"])
    assert code == 0
    res = _read(out)
    assert res["label_task"] == "multiclass" and res["data"]["class_names"] == ["benign", "malignant", "normal"]
    assert set(res["roc"]) == {"benign", "malignant", "normal"}
    pred = np.load(out / "predictions.npz")
    assert pred["test_probs"].shape == (res["data"]["test_size"], 3)
    np.testing.assert_allclose(pred["test_probs"].sum(1), 1.0, atol=1e-5)
    sk = roc_auc_score(pred["test_labels"], pred["test_probs"], multi_class="ovr", average="macro")
    assert res["metrics"]["test"]["auc"] == pytest.approx(sk, abs=1e-5)
    assert res["regime_info"]["frozen_stages"] == [0, 1]


def test_imagenet_missing_is_unavailable_never_random(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDPRETRAIN_IMAGENET_WEIGHTS", raising=False)
    out = tmp_path / "imnet"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), *TINY, "backbone.arch=resnet18",
                            "init=imagenet", f"weights={tmp_path / 'absent' / 'resnet18-f37072fd.pth'}",
                            f"output_dir={out}"])
    assert code == EXIT_UNAVAILABLE
    res = _read(out)
    assert res["status"] == "unavailable" and "ImageNet weights" in res["reason"]
    typed = read_results(out / "results.json")
    assert typed.status == "unavailable" and typed.score is None and typed.budget == 1.0
    assert not (out / "model.safetensors").exists() and not (out / "predictions.npz").exists()


def test_bad_regime_and_segmentation_on_labels_fail_before_work(tmp_path):
    from medpretrain.config import ConfigError

    with pytest.raises(ValueError, match="unknown regime"):
        main_in_process(["regime=partial", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="task=segmentation needs a mask dataset"):
        main_in_process(["task=segmentation", f"output_dir={tmp_path / 'y'}"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("spec,size", [("medmnist:pneumoniamnist", None), ("folder:busi", 32)])
def test_label_fractions_stratified_and_reproducible(spec, size):
    full = build_dataset(DataConfig(dataset=spec, image_size=size), "train")
    sub = build_dataset(DataConfig(dataset=spec, image_size=size, label_fraction=0.1), "train")
    again = build_dataset(DataConfig(dataset=spec, image_size=size, label_fraction=0.1), "train")
    other = build_dataset(DataConfig(dataset=spec, image_size=size, label_fraction=0.1, split_seed=1), "train")
    np.testing.assert_array_equal(sub.indices, again.indices)
    assert not np.array_equal(sub.indices, other.indices)
    assert set(sub.indices) <= set(full.indices)
    full_counts = np.bincount(full.labels)
    # Stratified: each class keeps round(10%) of its members.
    np.testing.assert_array_equal(np.bincount(sub.labels, minlength=len(full_counts)),
                                  np.maximum(1, np.round(0.1 * full_counts)).astype(int))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
