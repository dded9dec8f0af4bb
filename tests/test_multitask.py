"""Multi-task fine-tuning (``tasks``): one backbone, one head per task, on real PneumoniaMNIST images.

Small manifests (PNGs in tmp_path: the real label plus derived / random columns) and a ChestMNIST-style
multi-label npz; cbr_tiny, 28 px, a few steps. Checks the loss against a hand-computed value, every task's
reported metrics against the saved predictions, validation selection on the weighted mean, the read-out, that a
single-task config is unchanged and that bad task specs fail in one line naming the key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import load_state_dict
from medpretrain.config import ConfigError, resolve_config
from medpretrain.data import build_dataset
from medpretrain.finetune import FinetuneConfig, main_in_process, output_dir, run_hash
from medpretrain.metrics import bootstrap_ci, classification_metrics
from medpretrain.multitask import MultiTask, ResolvedTask, TaskSpec
from medpretrain.regimes import MultiTaskClassifier
from medpretrain.results import load_predictions, read_results

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"train": 48, "val": 32, "test": 32}
TINY = ["backbone.arch=cbr_tiny", "optim.steps=4", "optim.eval_every=2", "optim.batch_size=16",
        "optim.eval_batch_size=256", "optim.augment=none", "n_bootstrap=50", "eval.reuse_images=0", "data.channels=1", "data.mean=0.5",
        "data.std=0.5"]
TWO_TASKS = [{"name": "pneumonia", "labels": ["pneumonia"], "kind": "binary", "weight": 1.0},
             {"name": "pair", "labels": ["g0", "g1"], "kind": "multiclass", "weight": 0.5}]


@pytest.fixture(scope="module")
def images(data_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per official PneumoniaMNIST split, its first normal and first pneumonia images, half each, alternating
    (the split starts with a long run of one class), and their labels."""
    z = np.load(data_root / "pneumoniamnist" / "pneumoniamnist_28.npz")
    out = {}
    for s, n in SIZES.items():
        y = z[f"{s}_labels"][:, 0].astype(int)
        idx = np.stack([np.flatnonzero(y == 0)[:n // 2], np.flatnonzero(y == 1)[:n // 2]], 1).reshape(-1)
        out[s] = (z[f"{s}_images"][idx], y[idx])
    return out


@pytest.fixture(scope="module")
def manifest(images, tmp_path_factory) -> Path:
    """PNGs + ``m.csv``: ``pneumonia`` (the real label), ``noise`` (seeded coin), ``g0`` / ``g1`` (one-hot of
    pneumonia XOR noise), ``split`` (the official one)."""
    root = tmp_path_factory.mktemp("mt")
    rng = np.random.default_rng(0)
    rows = []
    for split, (x, y) in images.items():
        for i, (img, lab) in enumerate(zip(x, y, strict=True)):
            name = f"{split}_{i}.png"
            Image.fromarray(img).save(root / name)
            noise = int(rng.integers(0, 2))
            rows.append({"image_path": name, "pneumonia": lab, "noise": noise, "g0": 1 - (lab ^ noise),
                         "g1": lab ^ noise, "split": split})
    with open(root / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "m.csv"


def _args(manifest: Path, out: Path, *extra: str, columns: str = "[pneumonia, noise, g0, g1]") -> list[str]:
    return ["--config", str(ROOT / "configs/finetune.yaml"), *TINY, f"data.dataset=manifest:{manifest}",
            "data.split_column=split", f"data.label_columns={columns}", f"output_dir={out}", *extra]


def _tasks(tasks: list[dict]) -> str:
    return "tasks=" + json.dumps(tasks)


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def test_two_head_loss_is_the_weighted_sum_known_answer(images):
    """Heads with zero weights and set biases: logits known, the loss computed by hand. Then trained heads: the
    loss against each head's loss written out (log-softmax / BCE by formula)."""
    torch.manual_seed(0)
    mt = MultiTask([ResolvedTask("a", "binary", (0,), ("x",), 0.3),
                    ResolvedTask("b", "multilabel", (1, 2), ("y", "z"), 2.0)])
    model = MultiTaskClassifier(build_backbone("cbr_tiny", 1, "small"), mt.outputs).eval()
    assert {n: tuple(h.weight.shape) for n, h in model.heads.items()} == {"a": (2, 128), "b": (2, 128)}
    x = torch.from_numpy(images["train"][0][:6, None].astype(np.float32) / 255.0)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        for h in model.heads.values():
            h.weight.zero_()
        model.heads["a"].bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # p(positive) = 3/4
        model.heads["b"].bias.zero_()  # every sigmoid 1/2
    # a: 4 positives (-log 3/4 each), 2 negatives (-log 1/4 each); b: BCE of 1/2 is log 2 for every element.
    expected = 0.3 * (4 * -math.log(0.75) + 2 * -math.log(0.25)) / 6 + 2.0 * math.log(2.0)
    with torch.no_grad():
        assert float(mt.loss(model(x), labels)) == pytest.approx(expected, rel=1e-6)

    torch.manual_seed(1)
    for h in model.heads.values():
        h.reset_parameters()
    out = model(x)
    za, zb = out["a"].double(), out["b"].double()
    ya = labels[:, 0].long()
    la = -(za.gather(1, ya[:, None])[:, 0] - za.exp().sum(1).log()).mean()
    pb = 1 / (1 + (-zb).exp())
    yb = labels[:, 1:].double()
    lb = -(yb * pb.log() + (1 - yb) * (1 - pb).log()).mean()
    per_task = {n: float(v.detach()) for n, v in mt.losses(out, labels).items()}
    assert per_task["a"] == pytest.approx(float(la.detach()), rel=1e-5)
    assert per_task["b"] == pytest.approx(float(lb.detach()), rel=1e-5)
    assert float(mt.loss(out, labels).detach()) == pytest.approx(float((0.3 * la + 2.0 * lb).detach()), rel=1e-5)
    # Each head's gradient comes from its own task only, scaled by its weight.
    mt.loss(out, labels).backward()
    grad_b = model.heads["b"].bias.grad.clone()
    model.zero_grad()
    (2.0 * mt.losses(model(x), labels)["b"]).backward()
    assert torch.allclose(model.heads["b"].bias.grad, grad_b)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def _check_tasks_against_predictions(res: dict, out: Path, weights: dict[str, float]) -> None:
    """Every task's test metrics and CI are those of its saved predictions; the run's metrics are their
    weighted mean; the column view is what a multi-label run saves."""
    pred = load_predictions(out / "predictions.npz")
    assert pred.tasks is not None and list(pred.tasks) == list(weights)
    tasks = res["tasks"]
    assert list(tasks) == list(weights)
    for name, t in tasks.items():
        p, y = pred.tasks[name]["probs"], pred.tasks[name]["labels"]
        assert t["metrics"]["test"] == pytest.approx(classification_metrics(p, y, t["kind"], threshold=t["threshold"]))
        assert t["ci"] == bootstrap_ci(p, y, t["kind"], n_boot=50, seed=0, threshold=t["threshold"])
        assert t["weight"] == weights[name]
    total = sum(weights.values())
    for m, v in res["metrics"]["test"].items():
        assert v == pytest.approx(sum(w * tasks[n]["metrics"]["test"][m] for n, w in weights.items()) / total)
    assert set(res["metrics"]["test"]) == {"auc", "accuracy", "sensitivity", "specificity", "precision", "f1"}
    assert res["ci"]["auc"]["low"] <= res["metrics"]["test"]["auc"] <= res["ci"]["auc"]["high"]
    assert pred.probs.shape == pred.labels.shape == (SIZES["test"], len(res["data"]["class_names"]))
    assert res["label_task"] == "multilabel" and "weighted mean" in res["metric_protocol"]


def test_two_heads_end_to_end_on_a_manifest(manifest, tmp_path, images):
    """A binary task and a multi-class task (one-hot columns) on the shared backbone, trained with ``full``."""
    out = tmp_path / "full"
    assert main_in_process(_args(manifest, out, _tasks(TWO_TASKS))) == 0
    res = _read(out)
    read_results(out / "results.json")  # the one reader takes it
    assert res["status"] == "complete" and res["data"]["class_names"] == ["pneumonia", "pair/g0", "pair/g1"]
    assert res["data"]["train_class_counts"][0] == int(images["train"][1].sum())
    _check_tasks_against_predictions(res, out, {"pneumonia": 1.0, "pair": 0.5})
    assert res["tasks"]["pair"]["threshold"] is None and res["tasks"]["pair"]["threshold_rule"] == "argmax"
    assert res["threshold"][1:] == [None, None] and res["threshold"][0] == res["tasks"]["pneumonia"]["threshold"]

    # Selection on the weighted mean of the per-task validation AUCs, logged per period.
    hist = res["history"]
    assert len(hist) == 2
    for h in hist:
        assert h["val_auc"] == pytest.approx((h["val_pneumonia_auc"] + 0.5 * h["val_pair_auc"]) / 1.5)
    assert res["best_epoch"] == int(np.argmax([h["val_auc"] for h in hist])) + 1
    with open(out / "metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["epoch", "train_loss", "val_auc", "val_accuracy", "val_pneumonia_auc", "val_pair_auc", "lr",
                      "epoch_s", "step"]

    # One head per task in the saved model, and it reproduces the saved test probabilities.
    state, meta = load_state_dict(out / "model.safetensors")
    assert state["heads.pneumonia.weight"].shape == (2, 128) and state["heads.pair.weight"].shape == (2, 128)
    assert [t["name"] for t in meta["tasks"]] == ["pneumonia", "pair"] and "head.weight" not in state
    model = MultiTaskClassifier(build_backbone("cbr_tiny", 1, "small"), {"pneumonia": 2, "pair": 2})
    model.load_state_dict(state)
    cfg = resolve_config(FinetuneConfig, values=res["config"])
    x = torch.stack([s["image"] for s in build_dataset(cfg.data, "test")])
    with torch.no_grad():
        logits = model.eval()(x)
    pred = load_predictions(out / "predictions.npz")
    assert np.allclose(pred.tasks["pneumonia"]["probs"], logits["pneumonia"].softmax(1)[:, 1].numpy(), atol=1e-5)
    assert np.allclose(pred.tasks["pair"]["probs"], logits["pair"].softmax(1).numpy(), atol=1e-5)

    # The report lists each task's test metrics (build_report appends this section), next to the task alone.
    from medpretrain.report import multitask_markdown, run_regime

    alone = {**res, "regime": "full", "seed": 0, "tasks": {"pair": {**res["tasks"]["pair"],
             "metrics": {"test": {**res["tasks"]["pair"]["metrics"]["test"], "auc": 0.625}}}}}
    md = multitask_markdown([res, alone])
    assert md[0] == "## Multi-task runs: per-task test metrics" and run_regime(alone) == "full · pair"
    row = next(line for line in md if line.startswith("| scratch | full · pneumonia+pair | 1 | pair | multiclass"))
    assert f"| multiclass | 0.5 | {res['tasks']['pair']['metrics']['test']['auc']:.3f} |" in row
    assert row.endswith("| 0.625 |")


def test_chestmnist_style_npz_split_into_tasks_linear_probe(images, tmp_path):
    """A 14-finding multi-label npz (ChestMNIST's layout; column 6 'pneumonia' is the real label, the others
    seeded coins) split into a binary task by name and a multi-label task by index and name; ``linear``: one
    logistic regression per task on the same cached features, its C chosen on the task's own validation AUC and
    folded into that task's head."""
    rng = np.random.default_rng(1)
    arrays = {}
    for s, (x, y) in images.items():
        lab = rng.integers(0, 2, (len(y), 14))
        lab[:, 6] = y
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, lab.astype(np.uint8)
    (tmp_path / "chestmnist").mkdir()
    np.savez(tmp_path / "chestmnist" / "chestmnist_28.npz", **arrays)
    tasks = [{"labels": ["pneumonia"]}, {"name": "other", "labels": [0, "cardiomegaly"], "kind": "multilabel",
                                         "weight": 2.0}]
    out = tmp_path / "chest"
    args = ["--config", str(ROOT / "configs/finetune.yaml"), *TINY, "data.dataset=medmnist:chestmnist",
            f"data.root={tmp_path}", "regime=linear", f"output_dir={out}", _tasks(tasks)]
    assert main_in_process(args) == 0
    res = _read(out)
    assert res["data"]["class_names"] == ["pneumonia", "other/atelectasis", "other/cardiomegaly"]
    assert res["tasks"]["other"]["labels"] == ["atelectasis", "cardiomegaly"]
    assert len(res["tasks"]["other"]["threshold"]) == 2
    _check_tasks_against_predictions(res, out, {"pneumonia": 1.0, "other": 2.0})
    readout = res["regime_info"]["readout"]
    assert set(readout["C"]) == set(readout["tasks"]) == {"pneumonia", "other"}
    for name, fit in readout["tasks"].items():
        best = max(fit["candidates"], key=lambda c: (c["val_auc"], -c["C"]))
        assert readout["C"][name] == best["C"]
    state, _ = load_state_dict(out / "model.safetensors")  # the fitted read-outs are the saved heads
    assert state["heads.other.weight"].shape == (2, 128) and float(state["heads.other.weight"].abs().sum()) > 0


def test_knn_read_out_per_task_on_cached_features():
    """``knn``: each task votes over the same training bank with its own targets, its k chosen on its own
    validation AUC; the heads are zeroed (the read-out is the vote)."""
    from medpretrain.probe import Features, knn_probabilities, knn_readout, multitask_readout
    from medpretrain.regimes import parse_regime

    rng = np.random.default_rng(0)
    feats = {}
    for s, n in SIZES.items():
        y = rng.integers(0, 2, (n, 3)).astype(np.float32)
        y[:, 2] = 1 - y[:, 1]  # columns 1, 2: one-hot
        x = torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32) + 2 * y[:, :1])  # column 0 is learnable
        feats[s] = Features(x, y, np.arange(n))
    mt = MultiTask([ResolvedTask("a", "binary", (0,), ("x",), 1.0), ResolvedTask("b", "multiclass", (1, 2),
                                                                                 ("y", "z"), 3.0)])
    model = MultiTaskClassifier(build_backbone("cbr_tiny", 1, "small"), mt.outputs)
    fit, val, test, steps = multitask_readout(mt, model, feats, parse_regime("knn:5"))
    assert steps == 0 and fit.choice == {"k": {"a": 5, "b": 5}} and math.isnan(fit.train_loss)
    assert float(model.heads["a"].weight.detach().abs().sum()) == 0.0
    for t in mt.tasks:
        bank = Features(feats["train"].x, t.target(feats["train"].labels), feats["train"].index)
        query = Features(feats["test"].x, t.target(feats["test"].labels), feats["test"].index)
        assert np.allclose(test[f"probs:{t.name}"], knn_probabilities(bank, query, t.kind, t.num_outputs, 5))
        alone = knn_readout(bank, Features(feats["val"].x, t.target(feats["val"].labels), feats["val"].index),
                            t.kind, t.num_outputs, lambda p, y, k=t.kind: classification_metrics(p, y, k), ks=(5,))
        assert fit.extra["tasks"][t.name]["candidates"] == alone.candidates
    per_task = mt.task_metrics(val)
    assert fit.val_metrics["auc"] == pytest.approx((per_task["a"]["auc"] + 3 * per_task["b"]["auc"]) / 4)
    assert test["probs"].shape == (SIZES["test"], 3)


# ------------------------------------------------------------------------------------------------
# Single-task runs are unchanged
# ------------------------------------------------------------------------------------------------

OLD_KEYS = {"schema_version", "status", "task", "init_label", "regime", "seed", "label_fraction", "init", "label_task",
            "init_info", "init_warnings", "regime_info", "metrics", "ci", "ci_method", "roc", "best_epoch",
            "epochs_run", "optimizer_steps", "threshold", "threshold_rule", "epochs_to_95", "steps_to_95",
            "seconds_to_95", "history", "timing", "data", "config", "config_hash", "resolved_config_hash",
            "code_version", "torch", "run_dir"}
"""The keys of a single-task classification results.json before ``tasks`` existed (eval.reuse_images=0)."""


def test_single_task_config_is_unchanged(manifest, tmp_path):
    """No ``tasks``: the hash and folder of before (hash-neutral option), the old results keys; and a one-task
    config on the same column gives the single-task run's numbers exactly (``freeze:1``: a frozen stem)."""
    default = resolve_config(FinetuneConfig, ROOT / "configs/finetune.yaml")
    assert run_hash(default) == "a542d1cae0892342"  # computed before the option existed
    assert str(output_dir(default)) == "runs/finetune/classification/scratch/full/1/seed0"
    one_task = resolve_config(FinetuneConfig, ROOT / "configs/finetune.yaml", [_tasks(TWO_TASKS[:1])])
    assert run_hash(one_task) != run_hash(default)
    assert str(output_dir(one_task)) == "runs/finetune/classification/scratch/full/tasks-pneumonia/1/seed0"

    single, multi = tmp_path / "single", tmp_path / "one"
    base = ["--config", str(ROOT / "configs/finetune.yaml"), *TINY, f"data.dataset=manifest:{manifest}",
            "data.split_column=split", "regime=freeze:1", "optim.eval_every=4"]
    assert main_in_process([*base, "data.label_column=pneumonia", f"output_dir={single}"]) == 0
    assert main_in_process([*base, "data.label_columns=[pneumonia]", f"output_dir={multi}",
                            _tasks(TWO_TASKS[:1])]) == 0
    a, b = _read(single), _read(multi)
    assert set(a) == OLD_KEYS and a["label_task"] == "binary"
    assert a["regime_info"]["frozen_stages"] == b["regime_info"]["frozen_stages"] == [0]
    assert set(b) == OLD_KEYS | {"tasks", "metric_protocol"}
    assert b["metrics"] == a["metrics"] and b["ci"] == a["ci"] and b["threshold"] == [a["threshold"]]
    assert b["tasks"]["pneumonia"]["metrics"] == a["metrics"] and b["tasks"]["pneumonia"]["ci"] == a["ci"]
    assert [h["val_auc"] for h in b["history"]] == [h["val_auc"] for h in a["history"]]
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    pa, pb = load_predictions(single / "predictions.npz"), load_predictions(multi / "predictions.npz")
    assert np.array_equal(pa.probs, pb.tasks["pneumonia"]["probs"]) and pa.tasks is None


# ------------------------------------------------------------------------------------------------
# Bad specs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks, key, why", [
    ([{"name": "a"}], "tasks[0].labels", "at least one label"),
    ([{"labels": ["x", "y"]}], "tasks[0].labels", "exactly one label"),
    ([{"name": "m", "labels": ["x"], "kind": "multiclass"}], "tasks[0].labels", "two or more"),
    ([{"labels": ["x"], "weight": 0}], "tasks[0].weight", "positive"),
    ([{"labels": ["x"]}, {"labels": ["x", "y"], "kind": "multilabel"}], "tasks[1].name", "needs a name"),
    ([{"name": "a b", "labels": ["x"]}], "tasks[0].name", "letters, digits"),
    ([{"labels": ["x"]}, {"name": "x", "labels": ["y"]}], "tasks[1].name", "also the name of tasks[0]"),
    ([{"labels": ["x"], "kind": "ordinal"}], "tasks[0].kind", "is not one of"),
    ([{"labels": ["x"], "wieght": 2}], "tasks[0].wieght", "did you mean 'tasks[0].weight'"),
    ([{"labels": ["x", "x"], "kind": "multilabel", "name": "d"}], "tasks[0].labels", "twice"),
])
def test_bad_task_specs_are_one_line_config_errors(tasks, key, why):
    with pytest.raises(ConfigError) as e:
        resolve_config(FinetuneConfig, values={"tasks": tasks})
    text = str(e.value)
    assert f"'{key}'" in text and why in text and "\n" not in text


def test_tasks_the_data_cannot_serve_fail_before_the_run_folder(manifest, tmp_path):
    cases = [
        (_args(manifest, tmp_path / "a", _tasks([{"labels": ["nodule"]}])), "'tasks[0].labels': 'nodule' is not a "
         "label of"),
        (_args(manifest, tmp_path / "b", _tasks([{"name": "p", "labels": ["pneumonia", "noise"],
                                                  "kind": "multiclass"}])), "'tasks[0].kind': multiclass needs "
         "one-hot columns"),
        (["--config", str(ROOT / "configs/finetune.yaml"), *TINY, f"output_dir={tmp_path / 'c'}",
          _tasks([{"labels": ["pneumonia"]}])], "'tasks': needs a multi-label source"),
        (_args(manifest, tmp_path / "d", "task=segmentation", _tasks([{"labels": ["pneumonia"]}])),
         "'tasks': multi-task heads are classification only"),
    ]
    for args, why in cases:
        with pytest.raises(ConfigError) as e:
            main_in_process(args)
        assert why in str(e.value) and "\n" not in str(e.value)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_task_spec_defaults_name_from_its_label():
    from medpretrain.multitask import task_name, tasks_label

    assert task_name(TaskSpec(labels=["Pleural Effusion"])) == "Pleural_Effusion"
    many = [TaskSpec(labels=[f"finding_{i}"]) for i in range(14)]
    assert tasks_label(many[:2]) == "finding_0+finding_1"
    assert tasks_label(many).startswith("14tasks-") and len(tasks_label(many)) == 16
