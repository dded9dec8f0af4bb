"""The comparison report: aggregates by hand, plots produced, unavailable arms shown, and a small real grid."""

from __future__ import annotations

import csv
import json
import os
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
            'overrides=["backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=2", "optim.max_steps_per_epoch=2", '
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


# ------------------------------------------------------------------------------------------------
# recommend: validation chooses, test reports; honest uncertainty; the guard against nonsense
# ------------------------------------------------------------------------------------------------


def _cell(init: str, regime: str, frac: float, seed: int, test: float, val: float, ci: float = 0.02,
          run_dir: Path | None = None) -> dict:
    r = _fake(init, frac, seed, test, regime)
    r["metrics"]["val_best"] = {"auc": val}
    r["ci"]["auc"] = {"low": test - ci, "high": test + ci, "n": 100}
    r["config"]["optim"] = {"lr": 1e-3}
    if run_dir is not None:
        r["run_dir"] = str(run_dir)
    return r


def test_recommend_chooses_the_regime_on_validation_not_test():
    from medpretrain.report import recommend

    results = [
        # selfsup: full is better on validation, linear would win on test
        *[_cell("selfsup", "full", 0.1, s, t, v) for s, t, v in [(0, 0.80, 0.90), (1, 0.81, 0.91)]],
        *[_cell("selfsup", "linear", 0.1, s, t, v) for s, t, v in [(0, 0.95, 0.85), (1, 0.96, 0.84)]],
        *[_cell("scratch", "full", 0.1, s, t, v) for s, t, v in [(0, 0.70, 0.80), (1, 0.72, 0.79)]],
    ]
    [row] = recommend(results)
    w = row["winner"]
    assert row["selection"] == "validation"
    assert (w["init"], w["regime"]) == ("selfsup", "full")
    assert w["mean"] == pytest.approx(0.805) and w["val_mean"] == pytest.approx(0.905)
    assert w["alternatives"] == [{"regime_label": "linear", "val_mean": pytest.approx(0.845)}]
    assert row["runner_up"]["init"] == "scratch" and row["gap"] == pytest.approx(0.805 - 0.71)
    # no predictions: per-seed metrics; paired by seed (0, 1): d = (0.10, 0.09), df = 1; test variance from each
    # arm's CI half-width 0.02 / z (not divided by the seeds: they share the test set), arms independent
    z = 1.959963984540054
    var = 2 * (0.02 / z) ** 2 + np.var([0.10, 0.09], ddof=1) / 2
    assert row["test_kind"] == "per-seed metrics" and row["paired_seeds"] and row["df"] == 1
    assert row["se"] == pytest.approx(np.sqrt(var)) and row["uncertainty"] == row["se"]
    assert row["ci"][0] == pytest.approx(0.095 - 12.706204736 * np.sqrt(var))
    assert row["verdict"] == "not distinguishable"  # 2 seeds: t with 1 df


def test_recommend_with_an_lr_grid_chooses_the_lr_on_validation():
    from medpretrain.report import recommend, summarize

    results = []
    for lr, test, val in [(1e-3, 0.90, 0.70), (1e-2, 0.70, 0.90)]:
        for s in (0, 1):
            r = _cell("selfsup", "full", 1.0, s, test, val)
            r["config"]["optim"] = {"lr": lr}
            results.append(r)
    results += [_cell("scratch", "full", 1.0, s, 0.6, 0.6) for s in (0, 1)]
    labels = {s["regime_label"] for s in summarize(results)}
    assert labels == {"full @ lr 0.001", "full @ lr 0.01", "full"}
    [row] = recommend(results)
    assert row["winner"]["lr"] == 1e-2 and row["winner"]["regime_label"] == "full @ lr 0.01"
    assert row["winner"]["mean"] == pytest.approx(0.70)


def test_sub_chance_cell_is_flagged_not_recommended(tmp_path):
    from medpretrain.report import efficiency_markdown, recommend, recommendation_markdown, summarize

    results = [
        *[_cell("scratch", "linear", 0.05, s, t, 0.9) for s, t in [(0, 0.244), (1, 0.234)]],  # best on validation
        *[_cell("scratch", "full", 0.05, s, t, 0.6) for s, t in [(0, 0.70), (1, 0.72)]],
        *[_cell("simclr", "linear", 0.05, s, t, 0.8) for s, t in [(0, 0.45), (1, 0.47)]],
    ]
    rows = summarize(results)
    bad = next(s for s in rows if (s["init"], s["regime"]) == ("scratch", "linear"))
    assert bad["failed"].startswith("AUC 0.239 at or below chance (0.5): check the frozen BatchNorm statistics")
    assert bad["n_below_chance"] == 2
    assert not next(s for s in rows if s["regime"] == "full")["failed"]
    [row] = recommend(results)
    # scratch falls back to its valid regime; simclr has no valid cell left
    assert [(a["init"], a["regime"]) for a in row["ranking"]] == [("scratch", "full")]
    assert row["verdict"] == "only one init"
    assert {(f["init"], f["regime"]) for f in row["failed_cells"]} == {("scratch", "linear"), ("simclr", "linear")}
    md = "\n".join(recommendation_markdown([row]))
    assert "Failed cells, left out of the recommendation" in md and "- 0.05: simclr / linear (n=2): AUC 0.460" in md
    eff = "\n".join(efficiency_markdown(rows, "auc"))
    assert "0.239 ± 0.007 (n=2) ✗" in eff and "✗ scratch / linear at 0.05: AUC 0.239 at or below chance" in eff
    text = build_report(results, tmp_path / "rep").read_text()
    assert "## Which initialisation?" in text and "single (n=2) ✗ failed" in text
    assert "- scratch / linear / 0.05: AUC 0.239 at or below chance" in text and "(2 of 2 seeds)" in text


def _pred_runs(tmp_path: Path, init: str, sep: float, frac: float = 0.1, seeds=(0, 1, 2)) -> list[dict]:
    """Runs whose predictions.npz hold scores sep * y + N(0, 1) on one shared test set of 300 cases."""
    from medpretrain.results import save_predictions
    from medpretrain.stats import auc_score

    y = (np.random.default_rng(0).random(300) < 0.4).astype(int)
    runs = []
    for s in seeds:
        rng = np.random.default_rng(1000 * s + int(sep * 100) + len(init))
        probs = 1 / (1 + np.exp(-(sep * y + rng.normal(size=300))))
        d = tmp_path / init / f"{frac}" / f"seed{s}"
        save_predictions(d / "predictions.npz", probs.astype(np.float32), index=np.arange(300), labels=y)
        auc = auc_score(probs, y)
        runs.append(_cell(init, "full", frac, s, auc, auc, run_dir=d))
    return runs


def test_verdict_follows_the_paired_bootstrap_and_changes_when_the_gap_shrinks(tmp_path):
    from medpretrain.report import recommend, recommendation_markdown

    [row] = recommend(_pred_runs(tmp_path / "wide", "selfsup", 2.0) + _pred_runs(tmp_path / "wide", "scratch", 0.8))
    assert row["winner"]["init"] == "selfsup" and row["test_kind"] == "paired bootstrap + seeds"
    assert row["test"].startswith("paired bootstrap (2000 resamples of the 300 test cases)")
    assert "paired by seed, t with 2 df" in row["test"]
    assert row["ci"][0] > 0 and row["p_holm"] == row["p_value"] < 0.05 and row["verdict"] == "clear"
    assert row["bootstrap"]["n_boot"] == 2000 and row["bootstrap"]["var"] == pytest.approx(row["var_test"])
    assert row["delong"]["p_value"] < 0.001 and row["delong"]["diff"] > 0.1
    md = "\n".join(recommendation_markdown([row]))
    assert f"{row['gap']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]" in md and "| clear |" in md
    assert "Holm" in md and "Test used: *paired bootstrap" in md

    [row] = recommend(_pred_runs(tmp_path / "close", "selfsup", 1.0) + _pred_runs(tmp_path / "close", "scratch", 0.95))
    assert row["ci"][0] < 0 < row["ci"][1] and row["verdict"] == "not distinguishable"


def test_holm_over_budgets_turns_clear_into_likely():
    """One seed per arm, no predictions: gap 0.1, se = sqrt(2) x 0.06748 / 1.96 -> z = 2.054, p = 0.040 at each
    budget. One budget alone: clear; two budgets: Holm-adjusted p = 0.08 at both, so only *likely*."""
    from medpretrain.report import recommend

    def pair(frac: float) -> list[dict]:
        return [_cell("a", "full", frac, 0, 0.9, 0.9, ci=0.06748), _cell("b", "full", frac, 0, 0.8, 0.8, ci=0.06748)]

    [one] = recommend(pair(0.1))
    assert one["p_value"] == pytest.approx(0.040, abs=5e-4) and one["verdict"] == "clear" and one["single_seed"]
    rows = recommend(pair(0.1) + pair(1.0))
    assert [r["p_holm"] for r in rows] == pytest.approx([0.080, 0.080], abs=1e-3)
    assert [r["verdict"] for r in rows] == ["likely", "likely"] and rows[0]["holm_m"] == 2


def test_segmentation_guard_uses_the_trivial_mask_dice(tmp_path):
    from medpretrain.metrics import segmentation_metrics
    from medpretrain.report import _dice_per_image, summarize, trivial_dice
    from medpretrain.results import save_predictions

    rng = np.random.default_rng(0)
    masks = (rng.random((3, 33, 34)) < 0.3).astype(np.uint8)
    rois = np.ones_like(masks)
    rois[:, :, :4] = 0
    probs = np.clip(masks * 0.6 + rng.random(masks.shape) * 0.5, 0, 1)
    dice = _dice_per_image(probs, masks, rois, 0.5)
    assert dice == pytest.approx([segmentation_metrics(p, m, r)["dice"]
                                  for p, m, r in zip(probs, masks, rois, strict=True)])
    value, kind = trivial_dice(masks, rois)
    pos, area = (masks * rois).sum((1, 2)), rois.sum((1, 2))
    assert kind == "foreground" and value == pytest.approx(np.mean(2 * pos / (pos + area)))
    assert trivial_dice(np.zeros_like(masks), rois) == (1.0, "background")
    save_predictions(tmp_path / "predictions.npz", probs, masks, rois, index=np.arange(3))
    low = _fake_seg("scratch", 2, 0, 0.30, tmp_path)  # below the all-foreground mask's Dice (~0.46)
    good = _fake_seg("simclr", 2, 0, 0.70, tmp_path)
    rows = {s["init"]: s for s in summarize([low, good], headline="dice")}
    assert rows["scratch"]["chance"] == pytest.approx(value) and rows["scratch"]["chance_kind"] == "all-foreground mask"
    assert rows["scratch"]["failed"].startswith(f"Dice 0.300 at or below the all-foreground mask's {value:.3f}")
    assert rows["simclr"]["failed"] is None
    # no predictions file: only a constant mask (Dice, sensitivity or specificity 0) is caught
    blind = {s["init"]: s for s in summarize([_fake_seg("x", 2, 0, 0.0, tmp_path / "none"),
                                               _fake_seg("y", 2, 0, 0.3, tmp_path / "none")], headline="dice")}
    assert blind["x"]["failed"] and blind["y"]["failed"] is None and blind["y"]["chance"] is None


def test_segmentation_comparison_bootstraps_the_per_image_dice_of_averaged_maps(tmp_path):
    from medpretrain.report import _dice_per_image, recommend
    from medpretrain.results import load_predictions, save_predictions

    rng = np.random.default_rng(3)
    masks = (rng.random((6, 20, 21)) < 0.25).astype(np.uint8)
    rois = np.ones_like(masks)
    runs = []
    for init, noise in (("simclr", 0.3), ("scratch", 0.9)):
        for s in (0, 1):
            d = tmp_path / init / f"seed{s}"
            probs = np.clip(masks * 0.5 + 0.25 + rng.normal(scale=noise, size=masks.shape) * 0.3, 0, 1)
            save_predictions(d / "predictions.npz", probs, masks, rois, index=np.arange(6))
            dice = float(_dice_per_image(probs, masks, rois, 0.5).mean())
            runs.append(_fake_seg(init, 2, s, dice, d) | {"threshold": 0.5})
    [row] = recommend(runs)
    assert row["winner"]["init"] == "simclr" and row["test_kind"] == "paired bootstrap + seeds"
    assert "6 test images, per-image Dice" in row["test"] and row["delong"] is None
    maps = {i: np.mean([load_predictions(tmp_path / i / f"seed{s}" / "predictions.npz").probs for s in (0, 1)], 0)
            for i in ("simclr", "scratch")}
    gap = (_dice_per_image(maps["simclr"], masks, rois, 0.5) - _dice_per_image(maps["scratch"], masks, rois, 0.5)).mean()
    assert row["bootstrap"]["gap"] == pytest.approx(gap) and row["bootstrap"]["metric"] == "dice"


def test_feature_reuse_and_convergence_in_steps_are_reported(tmp_path):
    """The report's reuse section averages each stage's weight change and CKA over seeds, per init; the
    convergence table gives steps and seconds to 95% of the best validation score."""
    stages = ["conv1+bn1", "layer1", "layer2"]

    def run(init: str, seed: int, change: list[float], cka: list[float]) -> dict:
        r = _fake(init, 1.0, seed, 0.9)
        r.update(transfer={"stages": stages, "weight_change": change, "cka": cka, "n_images": 64},
                 steps_to_95=100 * (seed + 1), seconds_to_95=10.0 * (seed + 1))
        return r

    results = [run("simclr", 0, [0.01, 0.02, 0.3], [0.99, 0.97, 0.5]),
               run("simclr", 1, [0.03, 0.04, 0.5], [0.97, 0.95, 0.3]),
               run("scratch", 0, [0.4, 0.5, 0.6], [0.2, 0.2, 0.1])]
    text = build_report(results, tmp_path / "rep").read_text()
    assert "## Where the features are reused" in text
    assert "| simclr | full | 0.020 / 0.98 | 0.030 / 0.96 | 0.400 / 0.40 |" in text  # seed means
    assert "| scratch | full | 0.400 / 0.20 | 0.500 / 0.20 | 0.600 / 0.10 |" in text
    png = (tmp_path / "rep" / "reuse.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert "| simclr | full | 1 | 4.0 ± 0.0 | 150 ± 71 | 15.0 ± 7.1 |" in text  # steps / seconds to 95%


def test_reuse_lower_k_sweep_is_tabled_and_plotted(tmp_path):
    """reinit:<k> regimes become the "reuse the lower k stages" curve, ordered by k with full at the end."""
    results = []
    for seed in (0, 1):
        for regime, auc in (("reinit:1", 0.80), ("reinit:3", 0.86), ("full", 0.90)):
            r = _fake("simclr", 1.0, seed, auc + 0.01 * seed, regime)
            r["steps_to_95"] = {"reinit:1": 120, "reinit:3": 80, "full": 60}[regime]
            results.append(r)
    text = build_report(results, tmp_path / "rep").read_text()
    section = text.split("## Reuse the lower k stages", 1)[1].split("\n## ", 1)[0]
    i1, i3, ifull = (section.index(f"| simclr | {k} |") for k in ("1", "3", "full"))
    assert i1 < i3 < ifull
    assert "| simclr | 3 | 0.865 ± 0.007 | 80 ± 0 |" in section
    png = (tmp_path / "rep" / "reuse_k.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_cross_init_ensemble_of_identical_members_equals_the_member_and_mixes_otherwise(tmp_path):
    from medpretrain.report import cross_init_ensembles
    from medpretrain.stats import auc_score

    same = _pred_runs(tmp_path / "same", "simclr", 1.5)
    twin = [{**r, "init_label": "simclr_copy"} for r in same]  # the very same predictions under another name
    [row] = cross_init_ensembles(same + twin, n_boot=200)
    assert sorted(row["members"]) == ["simclr", "simclr_copy"]
    assert all(v["gap"] == 0.0 and v["ci"] == [0.0, 0.0] and v["p_value"] == 1.0 for v in row["vs"])
    assert row["score"] == pytest.approx(row["vs"][0]["score"])

    a, b = _pred_runs(tmp_path / "mix", "selfsup", 1.5), _pred_runs(tmp_path / "mix", "scratch", 1.0)
    [row] = cross_init_ensembles(a + b, n_boot=200)
    from medpretrain.results import load_predictions

    mean = [np.mean([load_predictions(Path(r["run_dir"]) / "predictions.npz").probs for r in arm], axis=0)
            for arm in (a, b)]
    y = load_predictions(Path(a[0]["run_dir"]) / "predictions.npz").labels
    assert row["score"] == pytest.approx(auc_score((mean[0] + mean[1]) / 2, y))
    by = {v["init"]: v for v in row["vs"]}
    assert by["scratch"]["gap"] == pytest.approx(row["score"] - auc_score(mean[1], y))
    assert by["scratch"]["ci"][0] > 0  # the weaker member is clearly beaten by the mix
    text = build_report(a + b, tmp_path / "rep").read_text()
    assert "## Ensembles across initialisations" in text and f"| 0.1 | {', '.join(row['members'])} |" in text


def test_seed_ensembles_keep_multitask_cells_apart_from_single_task_ones(tmp_path):
    """A multi-task cell (``tasks``) of the same init, regime and budget is its own ensemble, never averaged with
    the single-task seeds (its regime reads ``full · a+b``, as in every other table of the report)."""
    from medpretrain.pipeline.ensembles import ensembles
    from medpretrain.stats import auc_score

    single = _pred_runs(tmp_path / "single", "simclr", 1.5)
    multi = [{**r, "tasks": {"a": {}, "b": {}}} for r in _pred_runs(tmp_path / "multi", "simclr", 0.3)]
    rows = {row["regime"]: row for row in ensembles(single + multi, n_boot=50)}
    assert set(rows) == {"full", "full · a+b"}
    assert rows["full"]["n"] == rows["full · a+b"]["n"] == 3
    from medpretrain.results import load_predictions

    preds = [load_predictions(Path(r["run_dir"]) / "predictions.npz") for r in single]
    expected = auc_score(np.mean([p.probs for p in preds], axis=0), preds[0].labels)
    assert rows["full"]["metrics"]["auc"] == pytest.approx(expected)
    assert rows["full · a+b"]["metrics"]["auc"] < rows["full"]["metrics"]["auc"] - 0.1


def test_recommendation_never_ranks_a_multitask_cell_against_single_task_ones(tmp_path):
    """A multi-task cell with the best validation score is not chosen as the init's configuration: its metric is
    the mean over tasks, not the headline task's."""
    from medpretrain.report import recommend

    single = _pred_runs(tmp_path / "single", "simclr", 1.0)
    multi = [{**r, "tasks": {"a": {}, "b": {}}} for r in _pred_runs(tmp_path / "multi", "simclr", 3.0)]
    scratch = _pred_runs(tmp_path / "s", "scratch", 0.5)
    [row] = recommend(single + multi + scratch, n_boot=200)
    chosen = {a["init"]: a for a in row["ranking"]}
    assert chosen["simclr"]["regime"] == "full" and chosen["simclr"]["n"] == 3
    assert not chosen["simclr"]["alternatives"]  # the multi-task cell is not even an alternative
    assert chosen["simclr"]["mean"] < 0.85  # the single-task cells' (sep 1.0), not the multi-task ones' (sep 3.0)


def test_grid_workers_run_cells_at_once_with_the_same_results(tmp_path, monkeypatch, capsys):
    """workers=2: the cells run in two spawned worker processes, each cell's output in its run.log; the
    results equal those of the same cells run one after the other (float rounding aside), in grid order."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    base = ["base_config=" + str(ROOT / "configs/finetune.yaml"), "inits=[scratch]", "regimes=[linear]",
            "label_fractions=[0.05]", "seeds=[0, 1]", "launcher=inprocess", "n_bootstrap=20", "name=w",
            'overrides=["backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=1", "optim.max_steps_per_epoch=2", '
            '"optim.batch_size=32", "n_bootstrap=20"]']
    _, one = run_grid(load_config(CompareConfig, [*base, f"runs_dir={tmp_path / 'one'}"]), sys.stdout)
    capsys.readouterr()
    _, two = run_grid(load_config(CompareConfig, [*base, f"runs_dir={tmp_path / 'two'}", "workers=2"]), sys.stdout)
    out = capsys.readouterr().out
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 cells on 2 worker processes of {threads} thread(s)" in out
    assert out.count(": complete in ") == 2 and "test (624)" not in out  # the cells' own lines went to run.log
    assert [(r.seed, r.status) for r in two] == [(0, "complete"), (1, "complete")] == [(r.seed, r.status) for r in one]
    for a, b in zip(one, two, strict=True):
        assert b.metrics["test"]["auc"] == pytest.approx(a.metrics["test"]["auc"], abs=1e-4)
        assert "test (624): auc" in (Path(b.run_dir) / "run.log").read_text()
    # the workers' own results, not copies: another seed, another subset, another number
    assert two[0].metrics["test"]["auc"] != two[1].metrics["test"]["auc"]


def test_learning_curves_skip_a_read_out_without_training_loss(tmp_path):
    """A kNN read-out records no training loss (NaN): its loss curve is left out, without numpy's
    "Mean of empty slice" warning, and the trained runs' curves are still drawn."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from medpretrain.report import plot_learning_curves

    knn = _fake("simclr", 0.1, 0, 0.8, regime="knn")
    knn["history"] = [{"epoch": 1, "train_loss": float("nan"), "val_auc": 0.8, "epoch_s": 1.0}]
    runs = [knn, _fake("scratch", 0.1, 0, 0.7), _fake("scratch", 0.1, 1, 0.7)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        path = plot_learning_curves(runs, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_seed_ensemble_applies_the_members_validation_thresholds_not_half(tmp_path):
    """A binary seed ensemble is scored at the mean of its members' validation-chosen thresholds (issue 14 item 7),
    not at 0.5: sensitivity / specificity follow that operating point, AUC does not depend on it."""
    from medpretrain.metrics import classification_metrics
    from medpretrain.pipeline.ensembles import ensembles, member_threshold
    from medpretrain.results import load_predictions

    runs = [{**r, "threshold": t} for r, t in zip(_pred_runs(tmp_path, "simclr", 1.5), (0.7, 0.8, 0.9), strict=True)]
    assert member_threshold(runs) == pytest.approx(0.8)
    [row] = ensembles(runs, n_boot=50)
    probs = np.mean([load_predictions(Path(r["run_dir"]) / "predictions.npz").probs for r in runs], axis=0)
    y = load_predictions(Path(runs[0]["run_dir"]) / "predictions.npz").labels
    at_08, at_05 = (classification_metrics(probs, y, "binary", threshold=t) for t in (0.8, 0.5))
    assert row["threshold"] == pytest.approx(0.8)
    assert row["metrics"]["specificity"] == pytest.approx(at_08["specificity"])
    assert row["metrics"]["specificity"] > at_05["specificity"] + 0.1  # 0.5 would be a different operating point
    assert row["metrics"]["auc"] == pytest.approx(at_05["auc"])
    lo, hi = row["ci"]["specificity"]["low"], row["ci"]["specificity"]["high"]
    assert lo <= at_08["specificity"] <= hi
    # per-label means for multi-label members, none for multi-class or a member without one
    assert member_threshold([{"threshold": [0.2, 0.6]}, {"threshold": [0.4, 0.8]}]) == pytest.approx([0.3, 0.7])
    assert member_threshold([{"threshold": 0.3}, {}]) is None
