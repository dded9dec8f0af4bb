"""Saved segmentation probability maps (uint16 ``predictions.npz``) and the seed ensembles of medpretrain.pipeline.ensembles.

Known numbers: quantisation keeps every decision at threshold 0.5, and on synthetic maps whose seed average
is the intersection of the two seeds' predictions the ensemble Dice is 6/7 (by hand).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medpretrain.metrics import per_image_metrics, segmentation_metrics
from medpretrain.pipeline.ensembles import ensembles
from medpretrain.results import load_predictions, quantize_probs, save_predictions

ROOT = Path(__file__).resolve().parent.parent


def test_quantize_keeps_threshold_decisions_exactly():
    below = np.nextafter(np.float32(0.5), np.float32(0))  # the largest float32 under 0.5
    p = np.array([0.0, 1.0, 0.5, below, 0.25, 0.75, 1 / 65535, 0.3], dtype=np.float32)
    q = quantize_probs(p)
    assert q.dtype == np.uint16
    assert q.tolist() == [0, 65535, 32768, 32767, 16384, 49151, 1, 19661]  # 0.75 * 65535 = 49151.25
    assert np.array_equal(q >= 32768, p >= 0.5)
    rng = np.random.default_rng(0)
    p = rng.random((3, 33, 34), dtype=np.float32)
    assert np.array_equal(quantize_probs(p) / 65535 >= 0.5, p >= 0.5)
    roi = np.zeros_like(p)
    roi[:, 1:] = 1
    assert (quantize_probs(p, roi)[:, 0] == 0).all() and np.array_equal(quantize_probs(p, roi)[:, 1:],
                                                                       quantize_probs(p)[:, 1:])
    for bad in (np.array([1.5]), np.array([-0.1]), np.array([np.nan])):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            quantize_probs(bad)


def test_save_load_roundtrip_same_metrics(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.random((2, 33, 34), dtype=np.float32)
    masks = (rng.random((2, 33, 34)) < 0.2).astype(np.float32)
    rois = np.ones_like(masks)
    rois[:, :4] = 0
    path = save_predictions(tmp_path / "p.npz", probs, masks, rois, np.array([5, 2]), ["test/b.tif", "test/a.tif"])
    with np.load(path, allow_pickle=False) as z:  # no pickled objects
        assert z["test_probs"].dtype == np.uint16 and z["test_probs"].shape == (2, 33, 34)
        assert (z["test_probs"][:, :4] == 0).all()  # outside the roi
    got = load_predictions(path)
    assert got["index"].tolist() == [5, 2] and got["names"].tolist() == ["test/b.tif", "test/a.tif"]
    assert np.array_equal(got["masks"], masks.astype(np.uint8)) and np.array_equal(got["rois"], rois.astype(np.uint8))
    assert np.abs(got["probs"] - probs)[rois > 0].max() <= 0.5 / 65535 + 1e-7
    for a, b in zip(per_image_metrics(got["probs"], got["masks"], got["rois"]),
                    per_image_metrics(probs, masks, rois), strict=True):
        for k in ("dice", "jaccard", "sensitivity", "specificity"):
            assert a[k] == b[k], k  # exact: the threshold decisions are unchanged
        assert a["auc"] == pytest.approx(b["auc"], abs=1e-4)  # only ties from the 1/65535 steps
    with pytest.raises(ValueError, match="three equal"):
        save_predictions(tmp_path / "q.npz", probs, masks[:1], rois, np.array([5, 2]))


def _run(tmp_path: Path, name: str, seed: int, probs: np.ndarray, masks: np.ndarray, rois: np.ndarray,
         names: list[str], n_train_images: int = 2) -> dict:
    run_dir = tmp_path / name
    save_predictions(run_dir / "predictions.npz", probs, masks, rois, np.arange(len(probs)), names)
    return {"status": "complete", "task": "segmentation", "label_task": "segmentation", "init_label": "selfsup",
            "regime": "full", "n_train_images": n_train_images, "label_fraction": n_train_images / 18, "seed": seed,
            "run_dir": str(run_dir), "config": {"seg": {"threshold": 0.5}}}


def test_seed_ensemble_scores_at_the_members_chosen_thresholds(tmp_path):
    """Each run's test threshold is chosen on validation (``threshold`` in results.json); the ensemble of the seeds
    uses their mean, not ``seg.threshold``: two identical runs at 0.3 give the single run's decisions."""
    mask = np.zeros((1, 4, 4), np.float32)
    mask[:, :, :2] = 1
    probs = np.where(mask > 0, 0.4, 0.2).astype(np.float32)  # vessels at 0.4: found at 0.3, missed at 0.5
    runs = [{**_run(tmp_path, f"s{i}", i, probs, mask, np.ones_like(mask), ["a"]), "threshold": t}
            for i, t in enumerate((0.25, 0.35))]
    [row] = ensembles(runs, n_boot=10)
    assert row["threshold"] == pytest.approx(0.3) and row["metrics"]["dice"] == 1.0
    [old] = ensembles([{k: v for k, v in r.items() if k != "threshold"} for r in runs], n_boot=10)
    assert old["threshold"] == 0.5 and old["metrics"]["dice"] == 0.0  # runs without one: seg.threshold


def test_seed_ensemble_of_synthetic_maps_has_the_known_dice(tmp_path):
    h, w = 8, 10
    mask = np.zeros((2, h, w), np.float32)
    mask[:, :, 2:6] = 1  # vessel: columns 2-5
    roi = np.ones((2, h, w), np.float32)
    roi[:, 0] = 0  # row 0 is outside the field of view
    a = np.zeros((2, h, w), np.float32)
    b = np.zeros((2, h, w), np.float32)
    a[0, :, 0:6] = 0.8  # seed 0 marks columns 0-5, seed 1 columns 3-9: their mean is 0.8 on 3-5, 0.4 elsewhere
    b[0, :, 3:10] = 0.8
    a[1], b[1] = mask[1], mask[1]  # image 2: both seeds are exact
    names = ["test/01.tif", "test/02.tif"]
    runs = [_run(tmp_path, "s0", 0, a, mask, roi, names), _run(tmp_path, "s1", 1, b, mask, roi, names),
            _run(tmp_path, "n5", 0, a, mask, roi, names, n_train_images=5)]  # alone in its group: no row
    rows = ensembles(runs, n_boot=200)
    assert len(rows) == 1
    e = rows[0]
    assert (e["init"], e["regime"], e["label_fraction"], e["n_train_images"], e["n"], e["seeds"]) == (
        "selfsup", "full", 2.0, 2, 2, [0, 1])
    # Image 1 inside the roi (rows 1-7): prediction = columns 3-5 (21 px), truth = columns 2-5 (28 px),
    # TP 21 -> Dice 42/49 = 6/7, Jaccard 3/4, sensitivity 3/4, specificity 1. Image 2: perfect.
    per = e["per_image"]
    assert [p["name"] for p in per] == names
    assert per[0]["dice"] == pytest.approx(6 / 7) and per[0]["jaccard"] == pytest.approx(0.75)
    assert per[0]["sensitivity"] == pytest.approx(0.75) and per[0]["specificity"] == 1.0
    assert per[1]["dice"] == 1.0
    assert e["metrics"]["dice"] == pytest.approx((6 / 7 + 1) / 2)
    assert e["metrics"]["sensitivity"] == pytest.approx((0.75 + 1) / 2)
    assert e["ci"]["dice"]["low"] == pytest.approx(6 / 7) and e["ci"]["dice"]["high"] == 1.0
    # Each seed alone is worse than the ensemble on image 1 (seed 0: Dice 0.8, seed 1: 6/11).
    assert segmentation_metrics(a[0], mask[0], roi[0])["dice"] == pytest.approx(0.8)
    assert segmentation_metrics(b[0], mask[0], roi[0])["dice"] == pytest.approx(6 / 11)

    # Runs scored on different test images (or a different order) cannot be averaged.
    other = _run(tmp_path, "s2", 2, b, mask, roi, names[::-1])
    with pytest.raises(ValueError, match="disagree on the test images"):
        ensembles([runs[0], other], n_boot=10)
    # A run without saved maps (older runs) is left out: one map left, no ensemble row.
    (tmp_path / "s1" / "predictions.npz").unlink()
    assert ensembles(runs[:2], n_boot=10) == []
