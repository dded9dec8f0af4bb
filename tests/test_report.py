"""The comparison report: aggregates by hand, plots produced, unavailable arms shown, and a small real grid."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medpretrain.config import load_config
from medpretrain.metrics import METRICS
from medpretrain.pipeline.grid import CompareConfig, grid, run_grid
from medpretrain.report import PLOTS, build_report, summarize

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake(init: str, frac: float, seed: int, auc: float, regime: str = "full") -> dict:
    test = {m: auc - 0.1 for m in METRICS} | {"auc": auc}
    return {
        "status": "complete", "init_label": init, "regime": regime, "label_fraction": frac, "seed": seed,
        "label_task": "binary", "metrics": {"test": test, "val_best": {"auc": auc}},
        "ci": {m: {"low": test[m] - 0.02, "high": test[m] + 0.02, "n": 100} for m in METRICS},
        "roc": {"pneumonia": {"fpr": [0, 0.2, 1], "tpr": [0, 0.8, 1], "auc": 0.8}},
        "history": [{"epoch": e, "train_loss": 1 / e, "val_auc": min(auc, 0.5 + 0.1 * e), "epoch_s": 2.0}
                    for e in range(1, 6)],
        "best_epoch": 5, "epochs_run": 5, "epochs_to_95": 4, "timing": {"mean_epoch_s": 2.0 + seed},
        "data": {"train_size": int(3882 * frac), "class_names": ["normal", "pneumonia"]},
        "config": {"data": {"dataset": "medmnist:pneumoniamnist"}},
    }


def test_summary_numbers_and_files(tmp_path):
    results = [
        _fake("scratch", 0.1, 0, 0.80), _fake("scratch", 0.1, 1, 0.90), _fake("scratch", 1.0, 0, 0.95),
        _fake("selfsup", 0.1, 0, 0.85), _fake("selfsup", 1.0, 0, 0.97), _fake("scratch", 1.0, 0, 0.9, "linear"),
        {"status": "unavailable", "init_label": "imagenet", "regime": "full", "label_fraction": 0.1, "seed": 0,
         "reason": "ImageNet weights for resnet18 not found"},
    ]
    rows = summarize(results)
    s = next(r for r in rows if (r["init"], r["regime"], r["label_fraction"]) == ("scratch", "full", 0.1))
    assert s["n"] == 2
    assert s["metrics"]["auc"]["mean"] == pytest.approx(0.85)
    assert s["metrics"]["auc"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["epoch_s"]["mean"] == pytest.approx(2.5)

    ens = [{"init": "scratch", "regime": "full", "label_fraction": 0.1, "n": 2,
            "metrics": {m: 0.88 for m in METRICS}, "ci": {m: {"low": 0.8, "high": 0.9} for m in METRICS},
            "roc": {"pneumonia": {"fpr": [0, 1], "tpr": [0, 1], "auc": 0.5}}}]
    report = build_report(results, tmp_path / "rep", ensembles=ens, notes=["a note"])
    text = report.read_text()
    for section in ("## Comparison", "## Label efficiency", "## ROC curves", "## Six-metric radar",
                    "## Learning curves", "## Unavailable arms"):
        assert section in text, section
    assert "0.850 ± 0.071" in text  # scratch, full, 0.1: mean ± sample sd of 0.80 and 0.90
    assert "ensemble of 2" in text and "[0.800, 0.900]" in text
    assert "**imagenet** (1 run(s)): ImageNet weights for resnet18 not found" in text
    assert "- a note" in text
    for png in PLOTS:
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
        assert f"]({png})" in text
    with open(tmp_path / "rep" / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 5 + 1  # 5 single groups + 1 ensemble row
    assert float(next(r for r in summary if r["kind"] == "single" and r["init"] == "selfsup"
                      and r["label_fraction"] == "1.0")["auc_mean"]) == pytest.approx(0.97)
    with open(tmp_path / "rep" / "runs.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 7 and runs[-1]["status"] == "unavailable"


def test_bad_metric_name(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of"):
        build_report([], tmp_path, metric="kappa")


def compare(argv: list[str]) -> Path:
    """What ``scripts/compare.py <argv>`` does: the grid, its runs and the report (progress on stdout)."""
    return run_grid(load_config(CompareConfig, argv), sys.stdout)[0]


@pytest.mark.slow
def test_compare_grid_real_data_with_unavailable_arm_and_skip(tmp_path, monkeypatch, capsys):
    """scratch vs a self-supervised export vs ImageNet (missing) on PneumoniaMNIST: 2 fractions x 2 seeds."""
    from medpretrain.backbones import build_backbone
    from medpretrain.checkpoint import BackboneMeta, save_backbone

    runs = tmp_path / "runs"
    save_backbone(runs / "pretrain" / "moco" / "a" / "backbone.safetensors", build_backbone("cbr_tiny", 1, "small"),
                  BackboneMeta(arch="cbr_tiny", in_channels=1, stem="small", image_size=28, method="moco"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MEDPRETRAIN_IMAGENET_WEIGHTS", raising=False)
    monkeypatch.setattr("medpretrain.init.SHARED_WEIGHTS_DIR", tmp_path / "no-weights")
    monkeypatch.setattr("medpretrain.init._hub_checkpoints_dir", lambda: tmp_path / "no-hub")
    argv = ["base_config=" + str(ROOT / "configs/finetune.yaml"), "inits=[scratch, selfsup, imagenet]",
            "regimes=[linear]", "label_fractions=[0.05, 0.1]", "seeds=[0, 1]", f"runs_dir={runs}",
            "launcher=inprocess", "n_bootstrap=50", "name=t",
            'overrides=["backbone.arch=cbr_tiny", "optim.epochs=2", "optim.max_steps_per_epoch=2", '
            '"optim.batch_size=32", "n_bootstrap=50"]']
    report = compare(argv)
    text = report.read_text()
    assert report == runs / "reports" / "t" / "report.md"
    assert "8 complete, 4 unavailable, 0 failed" in text
    assert "**imagenet** (4 run(s))" in text
    assert "3882" in text and "4708" in text  # the local-split note
    summary = list(csv.DictReader(open(report.parent / "summary.csv", newline="")))
    ens = [r for r in summary if r["kind"] == "ensemble"]
    assert len(ens) == 4  # (scratch, selfsup) x 2 fractions, each over 2 seeds

    # The ensemble row is the metric of the seed-averaged probabilities.
    from medpretrain.metrics import classification_metrics

    d = runs / "finetune" / "classification" / "scratch" / "linear" / "0.1"
    p = [np.load(d / f"seed{s}" / "predictions.npz") for s in (0, 1)]
    avg = classification_metrics((p[0]["test_probs"] + p[1]["test_probs"]) / 2, p[0]["test_labels"], "binary")
    row = next(r for r in ens if r["init"] == "scratch" and r["label_fraction"] == "0.1")
    assert float(row["auc_mean"]) == pytest.approx(avg["auc"], abs=1e-6)
    res = json.loads((d / "seed0" / "results.json").read_text())
    assert res["data"]["train_size"] == 388

    # A second call skips every complete run (same config hash) and rebuilds the report.
    mtime = (d / "seed0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    compare(argv)
    out = capsys.readouterr().out
    assert out.count(": done (") == 8
    assert (d / "seed0" / "results.json").stat().st_mtime_ns == mtime


def _fake_seg(init: str, n: int, seed: int, dice: float, run_dir: Path) -> dict:
    from medpretrain.metrics import SEG_METRICS

    test = {m: dice for m in SEG_METRICS} | {"jaccard": dice / (2 - dice)}
    return {
        "status": "complete", "task": "segmentation", "label_task": "segmentation", "init_label": init,
        "regime": "full", "label_fraction": n / 18, "n_train_images": n, "seed": seed,
        "metrics": {"test": test, "val_best": {"dice": dice}},
        "ci": {m: {"low": test[m] - 0.02, "high": test[m] + 0.02} for m in SEG_METRICS},
        "history": [{"epoch": e, "train_loss": 1 / e, "val_dice": dice * e / 3, "epoch_s": 1.0} for e in (1, 2, 3)],
        "best_epoch": 3, "epochs_run": 3, "epochs_to_95": 3, "timing": {"mean_epoch_s": 1.0},
        "data": {"train_size": n}, "config": {"data": {"dataset": "drive:drive"}}, "run_dir": str(run_dir),
    }


def test_segmentation_report_dice_budget_in_images_and_overlays(tmp_path):
    run_dir = tmp_path / "run0"
    run_dir.mkdir()
    (run_dir / "overlays.png").write_bytes(PNG_MAGIC + b"fake")
    results = [_fake_seg("scratch", 2, 0, 0.50, run_dir), _fake_seg("scratch", 2, 1, 0.60, tmp_path / "none"),
               _fake_seg("scratch", 18, 0, 0.70, run_dir), _fake_seg("selfsup", 18, 0, 0.75, tmp_path / "none"),
               {"status": "unavailable", "task": "segmentation", "init_label": "imagenet", "regime": "full",
                "label_fraction": 1.0, "n_train_images": 2, "seed": 0, "reason": "ImageNet weights missing"}]
    rows = summarize(results, headline="dice")
    s = next(r for r in rows if (r["init"], r["label_fraction"]) == ("scratch", 2.0))
    assert s["metrics"]["dice"]["mean"] == pytest.approx(0.55) and "accuracy" not in s["metrics"]
    report = build_report(results, tmp_path / "rep")
    text = report.read_text()
    assert "| Dice | Jaccard | Sens | Spec | AUC | Dice 95% CI |" in text
    assert "0.550 ± 0.071" in text  # scratch, 2 images: mean ± sample sd of 0.50 and 0.60
    assert "number of annotated training images" in text
    assert "## ROC curves" not in text and "## Prediction overlays" in text
    assert (tmp_path / "rep" / "overlays_scratch.png").read_bytes().startswith(PNG_MAGIC)
    assert "overlays_selfsup.png" not in text  # its run has no overlays file
    assert "**imagenet** (1 run(s))" in text
    summary = list(csv.DictReader(open(tmp_path / "rep" / "summary.csv")))
    assert {r["n_train_images"] for r in summary} == {"2.0", "18.0"}
    with pytest.raises(ValueError, match="cannot share"):
        build_report(results + [_fake("scratch", 0.1, 0, 0.8)], tmp_path / "mixed")


def test_compare_grid_for_segmentation_uses_image_budgets():
    cfg = load_config(CompareConfig, ["--config", str(ROOT / "configs/compare_drive.yaml"),
                                      f"base_config={ROOT / 'configs/finetune_drive.yaml'}"])
    cells = grid(cfg)
    assert len(cells) == 3 * 2 * 3 * 2
    assert sum("seg.n_train_images=2" in c for c in cells) == 12
    assert not any(a.startswith("data.label_fraction") for c in cells for a in c)
