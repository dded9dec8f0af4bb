"""finetune/run.py task=segmentation end to end on real DRIVE, tiny: cbr_tiny, 64 px patches, a few steps.

Checks outputs and numbers: the headline test Dice is the mean of the per-image Dice, metric ranges,
the seeded draw of annotated images, overlays, a frozen encoder that does not move (against the init
checkpoint, which loads into the U-Net encoder with the classifier's keys), and the unavailable ImageNet arm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, load_backbone_state, load_state_dict, save_backbone
from medpretrain.finetune import EXIT_UNAVAILABLE, main_in_process
from medpretrain.results import read_results

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--config", str(ROOT / "configs/finetune_drive.yaml"), "backbone.arch=cbr_tiny", "seg.patch_size=64",
        "seg.n_train_images=2", "seg.patches_per_image=4", "optim.batch_size=4", "optim.steps=0", "optim.epochs=2",
        "seg.sw_batch_size=64", "seg.sw_overlap=0", "n_bootstrap=100", "seg.n_overlays=2"]


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# The run shared by the output test and the kill-and-resume test: 60 optimiser steps of 8 patches, validated
# (and checkpointed) every 30, enough for the U-Net to find vessels (test Dice ~0.5 against ~0.23 for the
# all-vessel mask; 6 steps of 4 patches stay at that constant mask).
# The images at 320 px (not 565 x 584): the sliding-window passes over validation and the 20 test images took
# most of each run's time.
SHARED = ("optim.steps=60", "optim.eval_every=30", "optim.batch_size=8", "optim.milestones=[0.5]", "data.image_size=320")


def _seg_launch(out: Path, env_extra: dict[str, str] | None = None,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``accelerate launch`` through :mod:`medpretrain.launch` (exit status = the script's), one CPU thread:
    CPU kernels then reduce in one order, so the resumed and uninterrupted runs can match bitwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "medpretrain.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(ROOT / "finetune/run.py"), *TINY, *SHARED, f"output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=out.parent)


@pytest.fixture(scope="module")
def drive_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drive") / "ref"
    proc = _seg_launch(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_accelerate_launch_drive_outputs(drive_ref):
    out = drive_ref
    res = _read(out)
    assert res["status"] == "complete" and res["task"] == "segmentation" and res["label_task"] == "segmentation"
    typed = read_results(out / "results.json")
    assert typed.headline == "dice" and typed.score == res["metrics"]["test"]["dice"] and typed.budget == 2.0
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
    assert 1 <= res["best_epoch"] <= 2 and len(res["history"]) == 2 and res["optimizer_steps"] == 60
    # Above both constant masks of the test images, computed from the masks inside their fields of view:
    # all background scores 0, all vessel 2f/(1+f) per image (~0.23). A model that predicts nothing, or
    # vessels everywhere, fails; so does one whose maps do not rank vessels above background (AUC).
    from medpretrain.metrics import segmentation_metrics
    from medpretrain.results import load_predictions

    pred = load_predictions(out / "predictions.npz")
    assert pred["names"].tolist() == [p["name"] for p in per]
    constant = {name: np.mean([segmentation_metrics(fill(m), m, r)["dice"] for m, r in zip(pred["masks"], pred["rois"],
                                                                                          strict=True)])
                for name, fill in (("background", np.zeros_like), ("vessel", np.ones_like))}
    assert constant["background"] == 0.0 and 0.15 < constant["vessel"] < 0.3, constant
    assert test["dice"] > max(constant.values()) + 0.1, (test, constant)
    assert test["auc"] > 0.7 and 0 < test["sensitivity"] < 1 and 0 < test["specificity"] < 1, test
    assert test["dice"] < 0.9  # 60 steps on 2 images do not reach the annotators' agreement


def test_frozen_encoder_from_contract_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bb.safetensors"
    save_backbone(path, build_backbone("cbr_tiny", 1, "standard"),
                  BackboneMeta(arch="cbr_tiny", in_channels=1, stem="standard", image_size=64, mean=0.5, std=0.5,
                               method="simclr", dataset="drive:drive"))
    out = tmp_path / "lin"
    code = main_in_process([*TINY, f"init={path}", "regime=linear", "optim.epochs=1", f"output_dir={out}"])
    assert code == 0
    res = _read(out)
    initial, _ = load_backbone_state(path)
    trained, _ = load_state_dict(out / "model.safetensors")
    enc = {k[len("backbone."):]: v for k, v in trained.items() if k.startswith("backbone.")}
    assert set(enc) == set(initial)  # no missing, no unexpected encoder keys
    for k, v in initial.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(enc[k], v), k  # weights unchanged
    # The frozen encoder's BN statistics are re-estimated on the training patches before the decoder trains.
    assert not torch.equal(enc["blocks.0.bn.running_mean"], initial["blocks.0.bn.running_mean"])
    assert res["regime_info"]["bn_reestimated"]
    assert res["regime_info"]["frozen_params"] == sum(v.numel() for k, v in initial.items()
                                                      if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked")))
    assert res["regime_info"]["trainable_params"] > 0


def test_segmentation_imagenet_missing_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDPRETRAIN_IMAGENET_WEIGHTS", raising=False)
    out = tmp_path / "imnet"
    code = main_in_process([*TINY, "backbone.arch=resnet18", "init=imagenet",
                            f"weights={tmp_path / 'absent' / 'resnet18-f37072fd.pth'}", f"output_dir={out}"])
    assert code == EXIT_UNAVAILABLE
    res = _read(out)
    assert res["status"] == "unavailable" and res["task"] == "segmentation" and res["n_train_images"] == 2
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_the_uninterrupted_results(drive_ref, tmp_path):
    """The shared run (60 steps, validated and checkpointed every 30) killed right after step 40 (inside the
    second period) and resumed with resume=auto from the step-30 checkpoint: same steps, weights, metrics
    and saved maps as the uninterrupted run, bit for bit."""
    from medpretrain.pipeline.ensembles import ensembles
    from medpretrain.results import load_predictions

    ref_dir, out = drive_ref, tmp_path / "run"
    killed = _seg_launch(out, {"MEDPRETRAIN_FAULT_EXIT_AT_STEP": "40"})
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert not (out / "results.json").exists() and not (out / "predictions.npz").exists()
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] == ["1"]
    resumed = _seg_launch(out, extra=("resume=auto",))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "after epoch 1" in resumed.stdout + resumed.stderr

    a, b = _read(ref_dir), _read(out)
    assert a["optimizer_steps"] == b["optimizer_steps"] == 60 and a["epochs_run"] == b["epochs_run"] == 2
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    assert [h["val_dice"] for h in b["history"]] == [h["val_dice"] for h in a["history"]]
    assert b["best_epoch"] == a["best_epoch"]
    assert b["metrics"]["test"] == a["metrics"]["test"] and b["per_image"] == a["per_image"]
    (wa, _), (wb, _) = load_state_dict(ref_dir / "model.safetensors"), load_state_dict(out / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + periods 1-2, period 2 logged once

    # The saved test maps: uint16, one per test image in results order, same decisions as the reported metrics.
    pa, pb = load_predictions(ref_dir / "predictions.npz"), load_predictions(out / "predictions.npz")
    assert np.array_equal(pa["probs"], pb["probs"]) and pa["probs"].shape[0] == 20
    assert pa["names"].tolist() == [p["name"] for p in a["per_image"]]
    assert ((pa["probs"] == 0) | (pa["rois"] == 1)).all()  # zero outside the field of view
    # Ensemble of two identical runs = the single run's saved maps scored at its chosen threshold (exactly); against
    # the run's float maps only the uint16 rounding differs (none at 0.5; a few pixels at thresholds such as 0.45).
    from medpretrain.metrics import mean_metrics, per_image_metrics

    rows = ensembles([{**a, "run_dir": str(ref_dir)}, {**b, "run_dir": str(out), "seed": 1}], n_boot=100)
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["n_train_images"] == 2
    assert rows[0]["threshold"] == a["threshold"]
    saved = mean_metrics(per_image_metrics(pa["probs"], list(pa["masks"]), list(pa["rois"]), threshold=a["threshold"],
                                           seed=0))
    for k in ("dice", "jaccard", "sensitivity", "specificity"):
        assert rows[0]["metrics"][k] == pytest.approx(saved[k], rel=1e-12, abs=1e-12), k
        assert rows[0]["metrics"][k] == pytest.approx(a["metrics"]["test"][k], abs=1e-4), k
    assert rows[0]["metrics"]["auc"] == pytest.approx(a["metrics"]["test"]["auc"], abs=1e-4)

    # The report shows the ensemble row next to the single-run row.
    from medpretrain.report import build_report

    report = build_report([{**a, "run_dir": str(ref_dir)}, {**b, "run_dir": str(out), "seed": 1}],
                          tmp_path / "rep", ensembles=rows)
    text = report.read_text()
    ens_line = next(line for line in text.splitlines() if "ensemble of 2" in line)
    assert f"| {a['metrics']['test']['dice']:.3f} |" in ens_line
    summary = (tmp_path / "rep" / "summary.csv").read_text().splitlines()
    assert "n_train_images" in summary[0] and "dice_ci_low" in summary[0]
    assert summary[-1].startswith("ensemble,")
