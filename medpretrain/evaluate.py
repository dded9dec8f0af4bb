"""Evaluation without training: a finished fine-tuning run scored on another data set (cross-dataset use).

    python scripts/evaluate.py eval_only=runs/finetune/segmentation/scratch/full/nall/seed0 \\
        data.dataset=segpairs:chase/images,chase/masks data.derive_fov=true split=whole

The model (``model.safetensors`` of a ``finetune/run.py`` output folder, loaded with exact keys) and the
decision threshold it chose on *its own* validation split are applied unchanged to ``split`` of the data
set given: ``test`` (that set's test split, as a fine-tuning run on it would carve it) or ``whole`` (every
image of it: an external test set). Nothing is re-selected or re-thresholded on the new set.

The evaluation config is the run's own ``config.yaml`` with ``key=value`` overrides on top. Only what
describes the data and the inference may change (:data:`ALLOWED`: ``data.*``, the sliding window, the
bootstrap, the output folder); ``backbone.*``, ``seg.model`` and ``seg.full_resolution`` may be given but
must agree with the model, as must ``data.channels`` / ``data.mean`` / ``data.std`` (its input
contract): a model of another architecture or input channels is refused with one line
(:class:`ModelMismatch`), as is a data set of another task or other class names.

Outputs, as a fine-tuning run writes them (default folder ``<run>/evaluated/<data set>-<split>``):
``results.json`` (a :class:`~medpretrain.results.RunResult` with ``evaluated_from`` = the run folder, the run's
``threshold``, ``optimizer_steps``, budget and seed; ``history`` empty; ``data.trained_on`` the run's data set
and its own test metrics), ``predictions.npz`` (:func:`~medpretrain.results.save_predictions`), ``config.yaml``,
and for segmentation ``overlays.png``. :func:`medpretrain.report.build_report` shows such results as
"trained on A, tested on B" rows next to the run's own test score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from medpretrain.cli import UserError
from medpretrain.config import ConfigError, config_to_dict, load_config, parse_args, save_config
from medpretrain.results import RunResult, read_results

ALLOWED: tuple[str, ...] = (
    "data.", "seg.sw_batch_size", "seg.sw_overlap", "seg.n_overlays", "n_bootstrap", "optim.eval_batch_size",
    "output_dir", "runs_dir",
    # must agree with the model (checked against model.safetensors by check_model)
    "backbone.", "seg.model", "seg.full_resolution",
)
"""Override keys (prefixes ending in ``.``) an evaluation accepts on top of the run's ``config.yaml``."""

Split = Literal["test", "whole"]


class ModelMismatch(UserError):
    """The model of the run does not fit what the evaluation asks for (architecture, channels, task, classes)."""


@dataclass
class EvaluateConfig:
    """The options of ``scripts/evaluate.py`` that are not the run's own config."""

    eval_only: str = ""
    """The finished ``finetune/run.py`` output folder whose model is evaluated."""
    split: Split = "test"
    """``test``: the data set's test split (carved as a fine-tuning run on it would); ``whole``: every image."""


def split_argv(argv: list[str]) -> tuple[EvaluateConfig, list[str]]:
    """``argv`` -> (the :class:`EvaluateConfig` keys, the overrides of the run's config). Raises ``ConfigError``
    for a missing ``eval_only`` or a ``--config`` file (the run's ``config.yaml`` is the base)."""
    own = {f.name for f in dataclasses.fields(EvaluateConfig)}
    mine, rest = [], []
    for arg in argv:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body and body.split("=", 1)[0].replace("-", "_") in own:
            mine.append(body)
        else:
            rest.append(arg)
    cfg = load_config(EvaluateConfig, mine)
    if not cfg.eval_only:
        raise ConfigError("eval_only=<run folder> is required: the finished finetune/run.py output to evaluate")
    files, _ = parse_args(rest)
    if files:
        raise ConfigError(f"{files[0]}: an evaluation starts from the run's config.yaml; give key=value overrides")
    return cfg, rest


def _dotted(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def evaluation_config(run_dir: Path, overrides: list[str]) -> Any:
    """The run's ``config.yaml`` (a :class:`~medpretrain.finetune.FinetuneConfig`) with ``overrides`` applied.
    Raises ``ConfigError`` naming an override outside :data:`ALLOWED` or a run folder without its config."""
    from medpretrain.finetune import FinetuneConfig

    _, nested = parse_args(overrides)
    bad = [k for k in _dotted(nested) if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in ALLOWED)]
    if bad:
        raise ConfigError(f"{bad[0]}: cannot change in an evaluation (the model is trained already); allowed: "
                          f"{', '.join(a + '*' if a.endswith('.') else a for a in ALLOWED)}")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; eval_only needs a finished finetune/run.py output folder")
    cfg = load_config(FinetuneConfig, ["--config", str(path), *overrides])
    if "output_dir" not in nested:
        cfg.output_dir = None  # the run's own folder: never the evaluation's
    return cfg


def source_run(run_dir: Path) -> RunResult:
    """The run's ``results.json``; refused unless it is a complete training run (not itself an evaluation)."""
    try:
        res = read_results(run_dir / "results.json")
    except FileNotFoundError:
        raise UserError(f"{run_dir / 'results.json'}: not found; eval_only needs a finished finetune/run.py "
                        "output folder") from None
    assert res is not None
    if res.status != "complete":
        raise UserError(f"{run_dir / 'results.json'}: status {res.status!r}; only a complete run has a model")
    if res.evaluated_from:
        raise UserError(f"{run_dir}: is an evaluation of {res.evaluated_from}; evaluate that run instead")
    return res


def expected_arch(cfg: Any) -> str:
    """The architecture name ``finetune/run.py`` records for ``cfg``: the small U-Net's own, else the backbone's."""
    return "small_unet" if cfg.task == "segmentation" and cfg.seg.model == "small" else cfg.backbone.arch


def check_model(meta: dict[str, Any], cfg: Any, path: Path) -> None:
    """Refuse (:class:`ModelMismatch`, one line naming ``path``) a model whose task, architecture, stem, input
    channels, normalisation or decoder differ from the evaluation config's, and a k-NN read-out (no model)."""
    task = "segmentation" if meta.get("task") == "segmentation" else "classification"
    if task != cfg.task:
        raise ModelMismatch(f"{path}: a {task} model, but the config says task={cfg.task}")
    if meta.get("readout") == "knn":
        raise ModelMismatch(f"{path}: a k-NN read-out scores against its training features; it has no model to "
                            "evaluate on another set")
    checks = [("arch", expected_arch(cfg), "backbone.arch"), ("in_channels", cfg.data.channels, "data.channels"),
              ("mean", cfg.data.mean, "data.mean"), ("std", cfg.data.std, "data.std")]
    if task == "segmentation":  # seg.full_resolution: the U-Net's keys differ, the exact-key load refuses it
        checks.append(("seg_model", cfg.seg.model, "seg.model"))
    for field, want, key in checks:
        have = meta.get(field)
        if have is not None and have != want:
            raise ModelMismatch(f"{path}: the model has {field}={have!r}, but this evaluation asks for {key}={want!r}; "
                                "a trained model is evaluated as it was trained")
    stem = meta.get("stem")
    if cfg.backbone.stem not in ("auto", stem) and not (task == "segmentation" and cfg.seg.model == "small"):
        raise ModelMismatch(f"{path}: the model has stem={stem!r}, but this evaluation asks for "
                            f"backbone.stem={cfg.backbone.stem!r}")


def build_model(cfg: Any, meta: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """The run's model (U-Net or classifier) with ``state`` loaded with exact keys (:func:`load_exact`)."""
    from medpretrain.backbones import build_backbone
    from medpretrain.checkpoint import load_exact
    from medpretrain.regimes import Classifier
    from medpretrain.unet import UNet, small_unet

    if cfg.task == "segmentation" and cfg.seg.model == "small":
        model: torch.nn.Module = small_unet(cfg.data.channels)
    elif cfg.task == "segmentation":
        backbone = build_backbone(cfg.backbone.arch, cfg.data.channels, str(meta.get("stem") or "standard"))
        model = UNet(backbone, 1, full_resolution=cfg.seg.full_resolution)
    else:
        if "head.weight" not in state:
            raise ModelMismatch(f"{path}: holds no head.weight (not a finetune/run.py classifier)")
        backbone = build_backbone(cfg.backbone.arch, cfg.data.channels, str(meta.get("stem") or "standard"))
        model = Classifier(backbone, int(state["head.weight"].shape[0]), dropout=cfg.optim.dropout)
    try:
        load_exact(model, state, source=path)
    except ValueError as e:
        raise ModelMismatch(str(e)) from None
    return model


def default_output(run_dir: Path, dataset: str, split: str) -> Path:
    """``<run>/evaluated/<kind>-<last two folders of the first path>-<split>-<6 hex digits of spec and split>``,
    e.g. ``segpairs-chase-images-whole-1a2b3c``."""
    kind, _, rest = dataset.partition(":")
    first = Path(rest.split(",")[0]) if rest else Path()
    words = [kind, *first.parts[-2:]]
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(w for w in words if w)).strip("-.")[:48] or "data"
    digest = hashlib.sha256(f"{dataset}|{split}".encode()).hexdigest()[:6]
    return run_dir / "evaluated" / f"{slug}-{split}-{digest}"


def check_output(out: Path) -> None:
    """Refuse an output folder that exists (an evaluation is not resumed; a finished one is never overwritten)."""
    if out.exists() and any(out.iterdir()):
        done = " (it holds a finished evaluation)" if (out / "results.json").exists() else ""
        raise UserError(f"{out}: exists{done}; pick another output_dir")


def eval_dataset(cfg: Any, split: Split) -> Any:
    """``split`` of ``cfg.data``: its test split (:func:`medpretrain.data.build_dataset`) or every sample."""
    from medpretrain.data import build_dataset, read_source
    from medpretrain.data.dataset import MedicalDataset, digest_store

    if split == "test":
        return build_dataset(cfg.data, "test")
    source = read_source(cfg.data)
    n = len(source)
    return MedicalDataset(source, np.arange(n), spec=cfg.data.dataset, split="whole", in_channels=cfg.data.channels,
                          mean=cfg.data.mean, std=cfg.data.std,
                          split_info={"method": "whole set", "sizes": {"whole": n}}, digest_store=digest_store(cfg.data))


def _check_data(ds: Any, cfg: Any, meta: dict[str, Any], path: Path) -> None:
    if cfg.task == "segmentation":
        if ds.task != "segmentation":
            raise ModelMismatch(f"{cfg.data.dataset}: not a mask data set (task {ds.task!r}); {path} segments")
        return
    names = meta.get("class_names")
    if ds.task not in ("binary", "multiclass", "multilabel"):
        raise ModelMismatch(f"{cfg.data.dataset}: not a labelled classification data set (task {ds.task!r})")
    if names is not None and list(names) != list(ds.class_names):
        raise ModelMismatch(f"{cfg.data.dataset}: classes {ds.class_names} differ from the model's {names} ({path})")


def evaluate_run(run_dir: str | Path, cfg: Any, split: Split, accelerator: Any, out: Path) -> RunResult:
    """Score the model of ``run_dir`` on ``split`` of ``cfg.data`` at the run's threshold; write the outputs into
    ``out`` (main process) and return the :class:`RunResult` (``evaluated_from`` = ``run_dir``)."""
    from medpretrain.backbones import apply_memory_format
    from medpretrain.checkpoint import load_state_dict
    from medpretrain.finetune import predict, predict_images, run_hash, save_overlays
    from medpretrain.metrics import (
        bootstrap_ci,
        bootstrap_images,
        classification_metrics,
        mean_metrics,
        per_image_metrics,
        roc_curves,
    )
    from medpretrain.results import jsonable, save_predictions, write_results
    from medpretrain.utils import code_version

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    src = source_run(run_dir)
    if src.task != cfg.task:
        raise ModelMismatch(f"{run_dir}: a {src.task} run, but the config says task={cfg.task}")
    path = run_dir / "model.safetensors"
    state, meta = load_state_dict(path)
    check_model(meta, cfg, path)
    ds = eval_dataset(cfg, split)
    _check_data(ds, cfg, meta, path)
    model = build_model(cfg, meta, state, path)
    apply_memory_format(model, cfg.backbone.memory_format)
    seg = cfg.task == "segmentation"
    loader = DataLoader(ds, batch_size=1 if seg else cfg.optim.eval_batch_size, num_workers=cfg.data.num_workers)
    model, loader = accelerator.prepare(model, loader)
    threshold: Any = src.threshold  # float (binary, segmentation), one per label (multi-label) or None (argmax)
    fields: dict[str, Any]
    if seg:
        thr = float(threshold if isinstance(threshold, (int, float)) else cfg.seg.threshold)
        pred = predict_images(model, loader, cfg, accelerator)
        rows = per_image_metrics(list(pred["probs"]), list(pred["masks"]), list(pred["rois"]), threshold=thr,
                                 seed=cfg.seed)
        test_m = mean_metrics(rows)
        fields = {"per_image": [{"name": ds.names[int(i)], **r} for i, r in zip(pred["index"], rows, strict=True)],
                  "ci": bootstrap_images(rows, n_boot=cfg.n_bootstrap, seed=cfg.seed),
                  "ci_method": f"percentile bootstrap over test images, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
                  "metric_protocol": f"per-image pixel metrics inside the roi (threshold {thr:g}, chosen on the "
                                     "validation split of the training set), mean over the images; pixel AUC on at "
                                     "most 200000 roi pixels per image"}
        threshold = thr
    else:
        pred = predict(model, loader, ds.task, accelerator)
        test_m = classification_metrics(pred["probs"], pred["labels"], ds.task, threshold=threshold)
        fields = {"ci": bootstrap_ci(pred["probs"], pred["labels"], ds.task, n_boot=cfg.n_bootstrap, seed=cfg.seed,
                                     threshold=threshold),
                  "ci_method": f"percentile bootstrap over test cases, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
                  "roc": roc_curves(pred["probs"], pred["labels"], ds.task, class_names=ds.class_names)}
    src_data = src.data or {}
    data = {"dataset": cfg.data.dataset, "fingerprint": ds.fingerprint, "test_size": len(ds), "split": split,
            "split_info": ds.split_info, "train_size": src_data.get("train_size"),
            "trained_on": {"dataset": src_data.get("dataset"), "fingerprint": src_data.get("fingerprint"),
                           "test_size": src_data.get("test_size"),
                           "test_metrics": (src.metrics or {}).get("test")}}
    result = RunResult(
        status="complete", task=src.task, label_task=src.label_task, init=src.init, init_label=src.init_label,
        init_info=src.init_info, init_warnings=src.init_warnings, regime=src.regime, regime_info=src.regime_info,
        label_fraction=src.label_fraction, n_train_images=src.n_train_images, seed=src.seed,
        metrics={"test": test_m, "val_best": dict((src.metrics or {}).get("val_best") or {})},
        best_epoch=src.best_epoch, epochs_run=src.epochs_run, optimizer_steps=src.optimizer_steps,
        threshold=threshold, threshold_rule=f"{src.threshold_rule or 'as trained'} (of the evaluated run, kept)",
        history=[], data=jsonable(data),
        timing={"total_s": time.perf_counter() - t0, "mean_epoch_s": float("nan"),
                "processes": accelerator.num_processes, "device": str(accelerator.device)},
        config=config_to_dict(cfg), config_hash=run_hash(cfg), code_version=code_version(), torch=torch.__version__,
        run_dir=str(out), evaluated_from=str(run_dir), **jsonable(fields),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        if seg:
            save_overlays(out / "overlays.png", pred, ds, cfg.seg.n_overlays, float(threshold))  # type: ignore[arg-type]
            save_predictions(out / "predictions.npz", pred["probs"], pred["masks"], pred["rois"], pred["index"],
                             [ds.names[int(i)] for i in pred["index"]])
        else:
            save_predictions(out / "predictions.npz", pred["probs"], index=pred["index"], labels=pred["labels"])
        write_results(out, result)
    return result


__all__ = ["ALLOWED", "EvaluateConfig", "ModelMismatch", "build_model", "check_model", "check_output",
           "default_output", "eval_dataset", "evaluate_run", "evaluation_config", "expected_arch", "source_run",
           "split_argv"]
