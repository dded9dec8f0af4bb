"""Segmentation reports (per-image Dice and its spread, pixel AUC, threshold, steps, best / worst images) and
cross-dataset evaluation (a model fine-tuned on DRIVE scored on a ``segpairs:`` copy without retraining).

The synthetic tests check the numbers against hand computations; the end-to-end ones train one tiny DRIVE run
(cbr_tiny, 64 px patches, images at 320 px, 30 steps) and evaluate it on copies of DRIVE's test images laid
out as another retinal set: identical images must give the run's own per-image Dice exactly.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medpretrain.metrics import SEG_METRICS
from medpretrain.report import (
    SEG_PLOTS,
    _dice_per_image,
    best_worst,
    build_report,
    cross_dataset_rows,
    recommend,
    seg_details,
    summarize,
)
from medpretrain.results import load_predictions, save_predictions

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _seg_run(init: str, seed: int, per_image: dict[str, float], run_dir: Path, *, val: float, threshold: float,
             steps: int, auc: float = 0.9, n: int = 2) -> dict:
    """A complete segmentation result with ``per_image`` Dice rows (the headline is their mean)."""
    dice = float(np.mean(list(per_image.values())))
    test = {m: dice for m in SEG_METRICS} | {"auc": auc}
    return {
        "status": "complete", "task": "segmentation", "label_task": "segmentation", "init_label": init,
        "regime": "full", "label_fraction": n / 18, "n_train_images": n, "seed": seed,
        "metrics": {"test": test, "val_best": {"dice": val}},
        "ci": {m: {"low": test[m] - 0.02, "high": test[m] + 0.02} for m in SEG_METRICS},
        "per_image": [{"name": k, "dice": v, "auc": auc} for k, v in per_image.items()],
        "threshold": threshold, "threshold_rule": "dice-maximising on validation", "optimizer_steps": steps,
        "history": [{"epoch": 1, "train_loss": 1.0, "val_dice": val, "epoch_s": 1.0, "step": steps}],
        "best_epoch": 1, "epochs_run": 1, "epochs_to_95": 1, "timing": {"mean_epoch_s": 1.0},
        "data": {"train_size": n, "dataset": "drive:drive"}, "config": {"data": {"dataset": "drive:drive"}},
        "run_dir": str(run_dir),
    }


def test_per_image_dice_spread_threshold_steps_and_best_worst_images(tmp_path):
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 24, 25)) < 0.3).astype(np.uint8)
    rois = np.ones_like(masks)
    rois[:, :, :3] = 0
    names = [f"test/{i:02d}.tif" for i in range(5)]
    runs, maps = [], {}
    for init, noise, thr in (("scratch", 0.8, 0.4), ("simclr", 0.3, 0.5)):
        for seed in (0, 1):
            d = tmp_path / init / f"seed{seed}"
            probs = np.clip(masks * 0.5 + 0.25 + rng.normal(scale=noise, size=masks.shape) * 0.3, 0, 1)
            save_predictions(d / "predictions.npz", probs, masks, rois, index=np.arange(5), names=names)
            maps[(init, seed)] = load_predictions(d / "predictions.npz").probs
            t = thr + 0.1 * seed  # scratch: 0.4 / 0.5; simclr: 0.5 / 0.6
            dice = _dice_per_image(maps[(init, seed)], masks, rois, t)
            runs.append(_seg_run(init, seed, dict(zip(names, dice.tolist(), strict=True)), d,
                                 val=0.6 + 0.1 * seed, threshold=t, steps=480 + 10 * seed))
    rows = {r["init"]: r for r in seg_details(runs)}
    s = rows["scratch"]
    avg = np.mean([_dice_per_image(maps[("scratch", k)], masks, rois, 0.4 + 0.1 * k) for k in (0, 1)], axis=0)
    assert s["images"]["n"] == 5
    assert s["images"]["mean"] == pytest.approx(avg.mean())
    assert s["images"]["sd"] == pytest.approx(np.std(avg, ddof=1))
    assert (s["images"]["min"], s["images"]["max"]) == pytest.approx((avg.min(), avg.max()))
    assert (s["images"]["q1"], s["images"]["q3"]) == pytest.approx(tuple(np.percentile(avg, [25, 75])))
    means = [np.mean(_dice_per_image(maps[("scratch", k)], masks, rois, 0.4 + 0.1 * k)) for k in (0, 1)]
    assert s["seed_mean"]["std"] == pytest.approx(np.std(means, ddof=1))
    assert s["thresholds"] == pytest.approx([0.4, 0.5]) and s["steps"] == [480, 490]

    # The chosen model of each init at 2 images: seed 1 (better validation Dice); its extreme images.
    extremes = {r["init"]: r for r in best_worst(runs, 2.0)}
    e = extremes["simclr"]
    dice1 = _dice_per_image(maps[("simclr", 1)], masks, rois, 0.6)
    assert e["seed"] == 1 and e["threshold"] == pytest.approx(0.6)
    assert e["best"]["name"] == names[int(np.argmax(dice1))] and e["best"]["dice"] == pytest.approx(dice1.max())
    assert e["worst"]["name"] == names[int(np.argmin(dice1))] and e["worst"]["dice"] == pytest.approx(dice1.min())

    text = build_report(runs, tmp_path / "rep").read_text()
    assert "## Per-image Dice, threshold and steps" in text and "### Best and worst test images" in text
    line = next(row for row in text.splitlines() if row.startswith("| scratch | full | 2 | "))
    i = s["images"]
    assert (f"{i['mean']:.3f} ± {i['sd']:.3f} [{i['min']:.3f}, {i['q1']:.3f}-{i['q3']:.3f}, {i['max']:.3f}] "
            "(n=5)") in line
    assert "| 0.45 (0.40-0.50) | 485 (480-490) |" in line
    assert f"| simclr | full | 1 | {e['worst']['name']} | {e['worst']['dice']:.3f} |" in text
    for png in SEG_PLOTS:
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
        assert f"]({png})" in text
    table = {r["init"]: r for r in csv.DictReader(open(tmp_path / "rep" / "seg_details.csv", newline=""))}
    assert float(table["scratch"]["image_dice_sd"]) == pytest.approx(i["sd"])
    assert table["simclr"]["thresholds"] == "0.5 0.6" and table["simclr"]["optimizer_steps"] == "480 490"


def test_evaluations_are_cross_dataset_rows_not_cells(tmp_path):
    own = {"a.png": 0.8, "b.png": 0.6}
    trained = [_seg_run("scratch", s, own, tmp_path / "none", val=0.7, threshold=0.45, steps=100) for s in (0, 1)]
    evaluated = []
    for s, there in ((0, {"x.png": 0.5, "y.png": 0.3}), (1, {"x.png": 0.7, "y.png": 0.1})):
        r = _seg_run("scratch", s, there, tmp_path / "none", val=0.7, threshold=0.45, steps=100, auc=0.8)
        r["evaluated_from"] = f"runs/x/seed{s}"
        r["data"] = {"dataset": "segpairs:chase/images,chase/masks", "split": "whole", "test_size": 2,
                     "trained_on": {"dataset": "drive:drive", "test_metrics": {"dice": 0.7 + 0.02 * s}}}
        evaluated.append(r)
    # Not a cell: the comparison of the training runs is what it was without them.
    [cell] = summarize(trained + evaluated, headline="dice")
    assert cell["n"] == 2 and cell["metrics"]["dice"]["mean"] == pytest.approx(0.7)
    assert recommend(trained + evaluated)[0]["winner"]["n"] == 2
    [row] = cross_dataset_rows(trained + evaluated)
    assert (row["trained_on"], row["tested_on"], row["split"]) == ("drive:drive", "segpairs:chase/images,chase/masks",
                                                                  "whole")
    assert row["tested"]["mean"] == pytest.approx(0.4) and row["own"]["mean"] == pytest.approx(0.71)
    assert row["gap"] == pytest.approx(-0.31)
    assert row["images"]["mean"] == pytest.approx(0.4) and row["images"]["min"] == pytest.approx(0.2)  # y: (0.3+0.1)/2
    text = build_report(trained + evaluated, tmp_path / "rep").read_text()
    assert "2 complete, 0 unavailable, 0 failed, 2 evaluation(s) of finished runs on another data set." in text
    line = next(t for t in text.splitlines() if "`segpairs:chase/images,chase/masks`" in t)
    assert "| 0.710 ± 0.014 | 0.400 ± 0.000 | -0.310 |" in line and "[0.200, 0.600]" in line


def test_experiment_report_and_readme_show_the_segmentation_details(tmp_path):
    from types import SimpleNamespace

    from medpretrain.pipeline.report import readme_section, write_report
    from medpretrain.results import RunResult

    runs = [_seg_run("scratch", s, {"a.png": 0.9 - 0.1 * s, "b.png": 0.5}, tmp_path / "none", val=0.7,
                     threshold=0.35, steps=1000) | {"config_hash": "h"} for s in (0, 1)]
    cfg = SimpleNamespace(name="seg", title="DRIVE", description="")
    exp = tmp_path / "exp"
    exp.mkdir()
    text = write_report(cfg, exp, [], {"segmentation": [RunResult.from_dict(r) for r in runs]}, 0.0).read_text()
    # per image over the seeds: a (0.9 + 0.8) / 2 = 0.85, b 0.5; the seeds' means 0.7 and 0.65
    line = ("| scratch | full | 2 | 0.675 ± 0.247 [0.500, 0.588-0.763, 0.850] (n=2) | 0.675 ± 0.035 (n=2) | "
            "0.900 ± 0.000 | 0.35 | 1000 |")
    assert line in text
    saved = json.loads((exp / "experiment.json").read_text())["segmentation_details"]["segmentation"]
    assert saved[0]["images"]["sd"] == pytest.approx(np.std([0.85, 0.5], ddof=1))
    assert line in "\n".join(readme_section(exp, assets=tmp_path / "assets"))


# ------------------------------------------------------------------------------------------------
# End to end: train on drive:drive, evaluate on a segpairs: copy
# ------------------------------------------------------------------------------------------------

TINY = ["--config", str(ROOT / "configs/finetune_drive.yaml"), "backbone.arch=cbr_tiny", "seg.patch_size=64",
        "seg.n_train_images=2", "seg.patches_per_image=4", "optim.batch_size=8", "optim.steps=30",
        "optim.eval_every=30", "seg.sw_batch_size=64", "seg.sw_overlap=0", "n_bootstrap=50", "seg.n_overlays=1",
        "data.image_size=320", "eval.reuse_images=0"]


def evaluate_main(argv: list[str]):
    """``scripts/evaluate.py``'s ``main(argv)`` in this process (the script is not a module of the package)."""
    name = "medpretrain_evaluate_script"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "evaluate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.main(argv)


def _copy_as_segpairs(data_root: Path, dest: Path, *, fov: bool, subjects: bool = False) -> str:
    """The first 8 of DRIVE's test images laid out as another retinal set: ``images/``, ``masks/`` (and ``fov/``).
    ``subjects``: renamed as the left / right eye of 4 subjects, ``p<k><L|R>_img.tif`` (01, 02 -> p1L, p1R; ...)."""
    src = data_root / "drive" / "test"
    for sub in ("images", "masks", "fov"):
        (dest / sub).mkdir(parents=True)
    for k in range(1, 9):
        stem = f"p{(k + 1) // 2}{'LR'[(k + 1) % 2]}" if subjects else f"{k:02d}"
        shutil.copyfile(src / "images" / f"{k:02d}_test.tif", dest / "images" / f"{stem}_img.tif")
        shutil.copyfile(src / "1st_manual" / f"{k:02d}_manual1.gif", dest / "masks" / f"{stem}_manual1.gif")
        if fov:
            shutil.copyfile(src / "mask" / f"{k:02d}_test_mask.gif", dest / "fov" / f"{stem}_fov.gif")
    return f"segpairs:{dest / 'images'},{dest / 'masks'}" + (f",{dest / 'fov'}" if fov else "")


def _drive_name(name: str) -> str:
    """The DRIVE test name of a copied image (``03_img.tif`` or ``p2L_img.tif`` -> ``test/03_test.tif``)."""
    stem = name.split("_")[0]
    k = int(stem) if stem.isdigit() else 2 * int(stem[1:-1]) - (stem[-1] == "L")
    return f"test/{k:02d}_test.tif"


@pytest.fixture(scope="module")
def drive_run(tmp_path_factory, data_root) -> Path:
    from medpretrain.finetune import main_in_process

    out = tmp_path_factory.mktemp("eval") / "run"
    os.environ.setdefault("TQDM_DISABLE", "1")
    assert main_in_process([*TINY, f"output_dir={out}"]) == 0
    return out


@pytest.mark.slow
def test_evaluated_on_identical_images_gives_the_runs_own_dice(drive_run, data_root, tmp_path):
    spec = _copy_as_segpairs(data_root, tmp_path / "copy", fov=True)
    res = evaluate_main([f"eval_only={drive_run}", f"data.dataset={spec}", "split=whole"]).to_dict()
    own = json.loads((drive_run / "results.json").read_text())
    out = Path(res["run_dir"])
    assert out.parent == drive_run / "evaluated" and out.name.startswith("segpairs-copy-images-whole-")
    assert res["evaluated_from"] == str(drive_run) and res["data"]["trained_on"]["dataset"] == "drive:drive"
    assert res["threshold"] == own["threshold"] and res["optimizer_steps"] == own["optimizer_steps"] == 30
    # The known answer: the same images, model and threshold -> the run's own Dice, image by image.
    theirs = {p["name"]: p for p in own["per_image"]}
    assert [p["name"] for p in res["per_image"]] == [f"{k:02d}_img.tif" for k in range(1, 9)]
    for p in res["per_image"]:
        q = theirs[_drive_name(p["name"])]
        assert (p["dice"], p["auc"], p["sensitivity"], p["specificity"]) == (
            q["dice"], q["auc"], q["sensitivity"], q["specificity"]), p["name"]
    assert res["metrics"]["test"]["dice"] == pytest.approx(np.mean([theirs[_drive_name(p["name"])]["dice"]
                                                                    for p in res["per_image"]]), abs=1e-12)
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluated_from"] == str(drive_run) and (out / "overlays.png").stat().st_size > 5000
    pred = load_predictions(out / "predictions.npz")
    assert pred.probs.shape == (8, 320, 320) and pred.names.tolist() == [p["name"] for p in res["per_image"]]
    # The report: the run in the comparison, its evaluation as a "trained on A, tested on B" row with gap 0.
    text = build_report([own, saved], tmp_path / "rep").read_text()
    row = next(t for t in text.splitlines() if f"`{spec}` (whole, n=8)" in t)
    d, there = own["metrics"]["test"]["dice"], res["metrics"]["test"]["dice"]
    assert "| `drive:drive` |" in row and f"| {d:.3f} | {there:.3f} | {there - d:+.3f} |" in row
    assert summarize([own, saved], headline="dice")[0]["n"] == 1
    # A finished evaluation is never overwritten.
    from medpretrain.cli import UserError

    with pytest.raises(UserError, match="exists .it holds a finished evaluation"):
        evaluate_main([f"eval_only={drive_run}", f"data.dataset={spec}", "split=whole"])


@pytest.mark.slow
def test_test_split_of_a_set_without_fov_masks_grouped_by_subject(drive_run, data_root, tmp_path):
    """No FOV files (``data.derive_fov``) and a subject key from the file names (both eyes of a subject in one
    split): the test split holds whole subjects; the maps are the run's own inside both fields of view (the same
    images, model and preprocessing), the derived field of view matches DRIVE's official one (Dice >= 0.98; 0.996
    measured at 320 px), so the per-image Dice moves by the border pixels only (at most 0.011 measured)."""
    spec = _copy_as_segpairs(data_root, tmp_path / "copy", fov=False, subjects=True)
    res = evaluate_main([f"eval_only={drive_run}", f"data.dataset={spec}", "data.derive_fov=true",
                         "data.group_regex=^(?P<group>p\\d+)[LR]_", "data.test_fraction=0.25", "data.dedup=none",
                         f"output_dir={tmp_path / 'ev'}"]).to_dict()
    info = res["data"]["split_info"]
    assert info["method"] == "grouped" and info["groups"] == 4 and info["multi_image_groups"] == 4
    assert res["data"]["split"] == "test"
    names = [p["name"] for p in res["per_image"]]
    assert len(names) == 2 and names[0][:2] == names[1][:2] and {n[2] for n in names} == {"L", "R"}  # one subject
    ev, run = load_predictions(tmp_path / "ev" / "predictions.npz"), load_predictions(drive_run / "predictions.npz")
    at = {str(n): i for i, n in enumerate(run.names)}
    rows = [at[_drive_name(n)] for n in names]
    official, derived = run.rois[rows] > 0, ev.rois > 0
    both = official & derived
    assert np.array_equal(ev.probs * both, run.probs[rows] * both)
    fov_dice = 2 * both.sum((1, 2)) / (official.sum((1, 2)) + derived.sum((1, 2)))
    assert fov_dice.min() >= 0.98, fov_dice
    assert [p["dice"] for p in res["per_image"]] == pytest.approx(
        _dice_per_image(ev.probs, ev.masks, ev.rois, res["threshold"]).tolist(), abs=2e-3)  # uint16 maps
    own = {p["name"]: p["dice"] for p in json.loads((drive_run / "results.json").read_text())["per_image"]}
    for p in res["per_image"]:
        assert abs(p["dice"] - own[_drive_name(p["name"])]) < 0.02, (p["name"], p["dice"])


def test_another_architecture_or_input_channels_is_refused_in_one_line(drive_run, tmp_path):
    from medpretrain.config import ConfigError
    from medpretrain.evaluate import ModelMismatch

    base = [f"eval_only={drive_run}", "data.dataset=drive:drive", f"output_dir={tmp_path / 'x'}"]
    with pytest.raises(ModelMismatch, match=r"model.safetensors: the model has arch='cbr_tiny', but this evaluation "
                                            r"asks for backbone.arch='resnet18'"):
        evaluate_main([*base, "backbone.arch=resnet18"])
    with pytest.raises(ModelMismatch, match=r"the model has in_channels=1, but this evaluation asks for "
                                            r"data.channels=3"):
        evaluate_main([*base, "data.channels=3"])
    with pytest.raises(ConfigError, match="optim.steps: cannot change in an evaluation"):
        evaluate_main([*base, "optim.steps=5"])
    assert not (tmp_path / "x").exists()
    # Through the command line: one line on stderr, exit status 2.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *base, "data.channels=3"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and "in_channels=1" in proc.stderr


def test_a_classifier_evaluated_on_its_own_test_split_reproduces_its_metrics(tmp_path, data_root):
    """Classification through the same path: the metrics at the run's validation (Youden) threshold come back."""
    from medpretrain.finetune import main_in_process

    out = tmp_path / "cls"
    assert main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), "backbone.arch=cbr_tiny",
                            "optim.steps=4", "optim.eval_every=4", "optim.batch_size=32", "optim.augment=none",
                            "n_bootstrap=50", "eval.reuse_images=0", f"output_dir={out}"]) == 0
    own = json.loads((out / "results.json").read_text())
    res = evaluate_main([f"eval_only={out}", "data.dataset=medmnist:pneumoniamnist"]).to_dict()
    assert res["evaluated_from"] == str(out) and res["threshold"] == own["threshold"]
    assert res["metrics"]["test"] == pytest.approx(own["metrics"]["test"], abs=1e-6)
    assert res["data"]["test_size"] == own["data"]["test_size"] == 624
