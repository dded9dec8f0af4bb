"""finetune/run.py task=segmentation end to end on real DRIVE, tiny: cbr_tiny, 64 px patches, a few steps.

Checks outputs and numbers: the headline test Dice is the mean of the per-image Dice, metric ranges,
the seeded draw of annotated images, overlays, a frozen encoder that does not move (against the init
checkpoint, which loads into the U-Net encoder with the classifier's keys), and the unavailable ImageNet arm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, load_backbone_state, load_state_dict, save_backbone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "finetune"))
import run as finetune_run  # noqa: E402

TINY = ["--config", str(ROOT / "configs/finetune_drive.yaml"), "backbone.arch=cbr_tiny", "seg.patch_size=64",
        "seg.n_train_images=2", "seg.patches_per_image=4", "optim.batch_size=4", "optim.epochs=2",
        "seg.sw_batch_size=64", "seg.sw_overlap=0", "n_bootstrap=100", "seg.n_overlays=2"]


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_accelerate_launch_drive_outputs(tmp_path):
    out = tmp_path / "seg"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "finetune/run.py"), *TINY, f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _read(out)
    assert res["status"] == "complete" and res["task"] == "segmentation" and res["label_task"] == "segmentation"
    assert res["n_train_images"] == 2 and res["data"]["train_size"] == 2
    assert res["data"]["train_pool_size"] == 18 and res["data"]["val_size"] == 2 and res["data"]["test_size"] == 20
    assert len(set(res["data"]["train_images"])) == 2
    assert all(n.startswith("training/") for n in res["data"]["train_images"])
    assert {"config.yaml", "metrics.csv", "model.safetensors", "overlays.png", "results.json"} <= {
        p.name for p in out.iterdir()}
    assert (out / "overlays.png").stat().st_size > 10_000
    test = res["metrics"]["test"]
    assert set(test) == {"dice", "jaccard", "sensitivity", "specificity", "auc"}
    for k, v in test.items():
        assert 0.0 <= v <= 1.0, (k, v)
    per = res["per_image"]
    assert len(per) == 20 and all(p["name"].startswith("test/") for p in per)
    assert test["dice"] == pytest.approx(np.mean([p["dice"] for p in per]))
    # Dice and Jaccard are tied per image: J = D / (2 - D).
    for p in per:
        assert p["jaccard"] == pytest.approx(p["dice"] / (2 - p["dice"]), abs=1e-9)
    assert res["ci"]["dice"]["low"] <= test["dice"] <= res["ci"]["dice"]["high"]
    assert 1 <= res["best_epoch"] <= 2 and len(res["history"]) == 2
    # Vessels are ~12 % of the field of view: any prediction has Dice < 0.9 after 4 steps, and a U-Net
    # that predicts vessels everywhere still scores ~2f/(1+f) ~ 0.2; zero would mean a broken pipeline
    # unless it predicts nothing at all, in which case sensitivity is 0.
    assert test["dice"] < 0.9 and (test["dice"] > 0.05 or test["sensitivity"] < 0.05)


def test_frozen_encoder_from_contract_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bb.safetensors"
    save_backbone(path, build_backbone("cbr_tiny", 1, "standard"),
                  BackboneMeta(arch="cbr_tiny", in_channels=1, stem="standard", image_size=64, mean=0.5, std=0.5,
                               method="simclr", dataset="drive:drive"))
    out = tmp_path / "lin"
    code = finetune_run.main([*TINY, f"init={path}", "regime=linear", "optim.epochs=1", f"output_dir={out}"])
    assert code == 0
    res = _read(out)
    initial, _ = load_backbone_state(path)
    trained, _ = load_state_dict(out / "model.safetensors")
    enc = {k[len("backbone."):]: v for k, v in trained.items() if k.startswith("backbone.")}
    assert set(enc) == set(initial)  # no missing, no unexpected encoder keys
    for k, v in initial.items():
        assert torch.equal(enc[k], v), k  # weights and BN statistics unchanged
    assert res["regime_info"]["frozen_params"] == sum(v.numel() for k, v in initial.items()
                                                      if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked")))
    assert res["regime_info"]["trainable_params"] > 0


def test_segmentation_imagenet_missing_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDPRETRAIN_IMAGENET_WEIGHTS", raising=False)
    out = tmp_path / "imnet"
    code = finetune_run.main([*TINY, "backbone.arch=resnet18", "init=imagenet",
                              f"weights={tmp_path / 'absent' / 'resnet18-f37072fd.pth'}", f"output_dir={out}"])
    assert code == finetune_run.EXIT_UNAVAILABLE
    res = _read(out)
    assert res["status"] == "unavailable" and res["task"] == "segmentation" and res["n_train_images"] == 2
    assert not (out / "model.safetensors").exists()
