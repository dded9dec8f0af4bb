"""medpretrain.results: the typed results.json (one writer, one reader, schema_version, headline per task), old
files written before schema_version, and the one predictions writer / reader for both tasks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medpretrain.results import (
    SCHEMA_VERSION,
    Predictions,
    ResultsError,
    RunResult,
    headline_metric,
    load_predictions,
    read_results,
    save_predictions,
    write_results,
)


def _old_classification() -> dict:
    """A complete classification results.json as finetune/run.py wrote it before schema_version (key for key)."""
    test = {"auc": 0.8125, "accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5, "precision": 0.6667,
            "f1": 0.8}
    return {
        "status": "complete", "task": "classification", "label_task": "binary", "init": "scratch",
        "init_label": "scratch", "init_info": {"name": "scratch", "source": "random", "sha256": None, "meta": None,
                                               "notes": ["torchvision default init"]},
        "init_warnings": [], "regime": "full", "regime_info": {"trainable_params": 1234, "frozen": []},
        "label_fraction": 0.05, "seed": 0, "metrics": {"test": test, "val_best": dict(test, auc=0.7)},
        "ci": {"auc": {"low": 0.7, "high": 0.9}}, "ci_method": "percentile bootstrap over test cases, n=100",
        "roc": {"positive": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "auc": 0.8125}}, "best_epoch": 2, "epochs_run": 2,
        "epochs_to_95": None,
        "history": [{"epoch": 1, "train_loss": 0.3, "val_auc": 0.6, "val_accuracy": 0.7, "lr": 1e-3, "epoch_s": 1.0},
                    {"epoch": 2, "train_loss": 0.2, "val_auc": 0.7, "val_accuracy": 0.7, "lr": 1e-4, "epoch_s": 1.0}],
        "timing": {"mean_epoch_s": 1.0, "total_s": 3.0, "processes": 1, "device": "cpu"},
        "data": {"dataset": "medmnist:pneumoniamnist", "fingerprint": "abc", "train_size": 194, "val_size": 524,
                 "test_size": 624, "class_names": ["normal", "pneumonia"], "train_class_counts": [19, 175]},
        "config": {"task": "classification", "seed": 0}, "config_hash": "h1", "resolved_config_hash": "h1",
        "code_version": "0.1.0+abc", "torch": "2.5.0", "run_dir": "runs/finetune/x",
    }


def _old_segmentation() -> dict:
    test = {"dice": 0.7, "jaccard": 0.7 / 1.3, "sensitivity": 0.6, "specificity": math.nan, "auc": 0.9}
    d = _old_classification()
    del d["roc"]
    d.update(task="segmentation", label_task="segmentation", label_fraction=2 / 18, n_train_images=2,
             metrics={"test": test, "val_best": {"dice": 0.65}}, per_image=[{"name": "test/01.tif", **test}],
             metric_protocol="per-image pixel metrics inside the roi", optimizer_steps=6, epochs_to_95=2,
             history=[{"epoch": 1, "train_loss": 1.0, "val_dice": 0.65, "val_auc": 0.8, "lr": 1e-3, "epoch_s": 2.0}])
    return d


def _write(path, d: dict):
    path.write_text(json.dumps(d, indent=2, allow_nan=True))
    return path


def test_headline_metric_belongs_to_the_task():
    assert [headline_metric(t) for t in ("classification", "binary", "multiclass", "multilabel")] == ["auc"] * 4
    assert headline_metric("segmentation") == "dice"
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        headline_metric("detection")


def test_old_classification_file_loads_and_rewrites_with_a_version(tmp_path):
    old = _old_classification()
    r = read_results(_write(tmp_path / "results.json", old))
    assert r.status == "complete" and r.label_task == "binary" and r.headline == "auc" and r.score == 0.8125
    assert r.budget == 0.05 and r.n_train_images is None and r.epochs_to_95 is None
    # Same keys as before plus schema_version; epochs_to_95 stays (null) in a complete run.
    assert r.to_dict() == {"schema_version": SCHEMA_VERSION, **old}
    out = tmp_path / "again"
    out.mkdir()
    write_results(out, r)
    assert json.loads((out / "results.json").read_text())["schema_version"] == 1
    assert read_results(out / "results.json") == r


def test_old_segmentation_file_loads_with_nan_and_images_budget(tmp_path):
    r = read_results(_write(tmp_path / "results.json", _old_segmentation()))
    assert r.headline == "dice" and r.score == 0.7 and r.budget == 2.0 and r.optimizer_steps == 6
    assert math.isnan(r.metrics["test"]["specificity"])
    write_results(tmp_path, r)  # NaN is written as NaN (Python's json), and read back
    text = (tmp_path / "results.json").read_text()
    assert '"specificity": NaN' in text and math.isnan(read_results(tmp_path / "results.json").metrics["test"]
                                                        ["specificity"])


def test_old_unavailable_and_failed_records_load(tmp_path):
    unavailable = {"status": "unavailable", "reason": "ImageNet weights for resnet18 not found", "task": "classification",
                   "init": "imagenet", "init_label": "imagenet", "regime": "full", "seed": 0, "label_fraction": 1.0,
                   "n_train_images": None, "config": {}, "config_hash": "h", "code_version": "v"}
    r = read_results(_write(tmp_path / "u.json", unavailable))
    assert r.status == "unavailable" and r.score is None and r.headline == "auc"
    # A field that does not apply is left out of the file; nothing else changes.
    assert r.to_dict() == {"schema_version": 1, **{k: v for k, v in unavailable.items() if v is not None}}
    failed = {"status": "failed", "reason": "exit code 1; log run.log", "init_label": "scratch", "regime": "full",
              "label_fraction": None, "seed": 1, "log_tail": "Traceback ...", "task": "segmentation",
              "n_train_images": 5, "run_dir": "runs/x"}
    f = RunResult.from_dict(failed)
    assert f.status == "failed" and f.budget == 5.0 and f.log_tail == "Traceback ..."


@pytest.mark.parametrize("content,why", [
    ({**_old_classification(), "schema_version": 2}, "schema_version 2 was written by a newer medpretrain"),
    ({**_old_classification(), "schema_version": "1"}, "schema_version must be a whole number"),
    ({"val_mse": 0.01, "val_psnr": 20.0, "epochs": 3}, "unknown keys \\['epochs', 'val_mse', 'val_psnr'\\]"),
    ({"status": "complete", "task": "classification"}, "missing keys \\['init_label', 'regime'\\]"),
    ({k: v for k, v in _old_classification().items() if k != "metrics"}, "a complete run needs \\['metrics'\\]"),
    ({**_old_classification(), "status": "done"}, "status must be one of"),
    ({**_old_classification(), "task": "detection"}, "unknown task 'detection'"),
    ([1, 2], "expected a JSON object"),
])
def test_other_files_are_refused_with_the_reason(tmp_path, content, why):
    path = _write(tmp_path / "results.json", content)
    with pytest.raises(ResultsError, match=why) as err:
        read_results(path)
    assert str(path) in str(err.value)  # the message names the file


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "results.json").write_text('{"status": "complete", ')  # a truncated write
    with pytest.raises(ResultsError, match="not valid JSON"):
        read_results(tmp_path / "results.json")
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "absent.json")
    assert read_results(tmp_path / "absent.json", missing_ok=True) is None


def test_classification_predictions_roundtrip_exact(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((7, 3), dtype=np.float32)
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    path = save_predictions(tmp_path / "predictions.npz", probs, index=np.arange(10, 17), labels=labels)
    with np.load(path, allow_pickle=False) as z:  # the keys readers used before: test_probs/labels/index
        assert sorted(z.files) == ["test_index", "test_labels", "test_probs"]
    got = load_predictions(path)
    assert isinstance(got, Predictions) and got.task == "classification"
    assert np.array_equal(got.probs, probs) and got.probs.dtype == np.float32  # no quantisation for classes
    assert got["labels"].tolist() == labels.tolist() and got.index.tolist() == list(range(10, 17))
    assert got.masks is None and got.names is None
    with pytest.raises(KeyError):
        got["masks"]
    other = Predictions(probs=probs, index=np.arange(10, 17), labels=labels[::-1].copy())
    assert got.same_cases(got) and not got.same_cases(other)


def test_predictions_refuse_mixed_or_incomplete_input(tmp_path):
    probs = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros_like(probs)
    with pytest.raises(ValueError, match="not both"):
        save_predictions(tmp_path / "p.npz", probs, masks, masks, np.arange(2), labels=np.zeros(2))
    with pytest.raises(ValueError, match="needs labels"):
        save_predictions(tmp_path / "p.npz", probs, masks, index=np.arange(2))
    with pytest.raises(ValueError, match="3 indices for 2"):
        save_predictions(tmp_path / "p.npz", probs, masks, masks, np.arange(3))
    assert not (tmp_path / "p.npz").exists()
    np.savez(tmp_path / "other.npz", features=np.zeros(3))
    with pytest.raises(ResultsError, match="not a predictions file"):
        load_predictions(tmp_path / "other.npz")
