"""Fine-tune one initialisation on a labelled task: one init, one regime, one label fraction, one seed.

    accelerate launch finetune/run.py --config configs/finetune.yaml --init selfsup --regime linear
    accelerate launch finetune/run.py --config configs/finetune_busi.yaml init=imagenet data.label_fraction=0.1

``--init`` is ``scratch``, ``imagenet``, ``supervised:<run>`` (a fine-tuned model's backbone), ``selfsup`` / ``simclr`` / ``moco`` / ``vae`` / ``dcgan`` (the
latest export under ``runs_dir``) or a path to a backbone checkpoint (:mod:`medpretrain.init`).
``--regime`` is ``linear``, ``knn`` / ``knn:<k>``, ``freeze:<k>``, ``full`` or ``reinit:<k>``
(:mod:`medpretrain.regimes`); ``linear`` and ``knn`` classification runs are read-outs fitted on
cached frozen features (:mod:`medpretrain.probe`), frozen BatchNorm statistics are re-estimated.
The config is :class:`medpretrain.finetune.FinetuneConfig`.

The budget is ``optim.steps`` optimiser steps whatever the label fraction (validation every
``optim.eval_every`` steps; ``optim.steps=0``: ``optim.epochs`` passes, the older protocol), with the LR
schedule in steps and ``optim.augment`` (none / light / strong) applied to whole batches on the device.
Model selection uses the validation split only (best validation headline metric: AUC, Dice for
segmentation; optional early stopping); the decision threshold is then chosen on validation for the
selected weights (``eval.threshold``, Youden's J by default; ``seg.threshold_rule``: the Dice-maximising
threshold) and the test split is evaluated exactly once, at the end, with the selected weights and that
threshold. Output folder (default ``runs/finetune/<task>/<init>/<regime>/<fraction>/seed<k>``):

* ``results.json``: a :class:`medpretrain.results.RunResult` (test metrics, bootstrap CIs, ROC points,
  per-epoch history, config + hash, init info, data fingerprint, timings); ``status`` is ``complete`` or
  ``unavailable`` (the init is missing: the run stops with exit status 3, it never falls back to random weights);
* ``predictions.npz``: test probabilities, labels and indices (:func:`medpretrain.results.save_predictions`;
  the experiment pipeline ensembles them);
* ``model.safetensors`` (backbone + head, selected weights), ``config.yaml``, ``metrics.csv``.

``resume=auto`` continues from the newest complete epoch checkpoint in ``<output>/checkpoints``.

``task=segmentation`` (binary masks, e.g. ``data.dataset=drive:``) trains a :class:`medpretrain.unet.UNet`
whose encoder is the same backbone (``seg.model=small``: a small U-Net from scratch instead), on random paired patches (``seg.patch_size``) of ``seg.n_train_images``
annotated images; validation and test use MONAI's sliding-window inference over whole images and score
inside the roi (DRIVE's field of view). Outputs as above, with per-image test metrics in ``results.json``,
``overlays.png``, and ``predictions.npz`` holding the test probability maps as uint16 (0 outside the roi)
with the masks, rois and image names.

``tasks=[...]`` (multi-task classification, :mod:`medpretrain.multitask`): one head per task on the shared
backbone, each task reading columns of a multi-label source (``data.label_columns``, ChestMNIST's findings); the
loss is the weighted sum of the task losses, selection and ``metrics`` / ``ci`` use the weighted mean of the task
metrics, thresholds are chosen per task, each task's metrics and CIs are under ``tasks`` in ``results.json``, and
``metrics.csv`` adds ``val_<task>_auc`` columns (:func:`multitask`).

One training loop (:func:`train`) serves both tasks; each task supplies its
:class:`~medpretrain.finetune.TaskParts` (:func:`classification`, :func:`multitask`, :func:`segmentation`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from tqdm.auto import tqdm

from medpretrain import probe, transfer
from medpretrain.augment import TrainAugment
from medpretrain.backbones import apply_memory_format
from medpretrain.checkpoint import load_exact, load_state_dict, save_state_dict
from medpretrain.config import ConfigError, config_to_dict, load_config, save_config
from medpretrain.data import read_source
from medpretrain.data.synthetic import real_images
from medpretrain.faults import fault_hook
from medpretrain.finetune import (
    EXIT_UNAVAILABLE,
    Encoder,
    FinetuneConfig,
    InitUnavailable,
    Progress,
    TaskParts,
    budget_of,
    build_dataloaders,
    build_encoder,
    build_optimizer,
    build_seg_dataloaders,
    check_synthetic,
    classification_loss,
    complete_result,
    label_fraction,
    output_dir,
    predict,
    predict_images,
    run_hash,
    save_overlays,
    seg_loss,
    unavailable_result,
)
from medpretrain.metrics import (
    METRIC_LABELS,
    bootstrap_ci,
    bootstrap_images,
    classification_metrics,
    dice_threshold,
    mean_metrics,
    operating_threshold,
    per_image_metrics,
    roc_curves,
)
from medpretrain.multitask import PROTOCOL, MultiTask, resolve_tasks, task_name
from medpretrain.regimes import Classifier, MultiTaskClassifier, parse_regime
from medpretrain.results import RunResult, save_predictions, write_results
from medpretrain.stage import Stage, start_stage
from medpretrain.unet import build_seg_model
from medpretrain.utils import seed_everything

log = logging.getLogger("finetune")
VAL_COLUMNS = {"classification": ("auc", "accuracy"), "segmentation": ("dice", "auc")}
"""Validation metrics logged per epoch (``val_<name>`` columns of ``metrics.csv``), by task."""


def classification(cfg: FinetuneConfig, enc: Encoder, accelerator: Accelerator) -> TaskParts:
    """Labelled images -> :class:`~medpretrain.regimes.Classifier`; metrics, CIs and ROC over test cases."""
    if cfg.tasks:
        return multitask(cfg, enc, accelerator)
    parts = build_dataloaders(cfg, accelerator.num_processes)
    ds = parts["datasets"]
    train_ds = ds["train"]
    real = real_images(train_ds)  # the label budget; data.synthetic's images come on top (parts["data"])
    task = train_ds.task
    if task not in ("binary", "multiclass", "multilabel"):
        raise ConfigError(f"task=classification needs a labelled classification dataset, got task {task!r}")
    num_outputs = 2 if task == "binary" else train_ds.num_classes
    counts = (np.bincount(real.labels, minlength=num_outputs).tolist() if task != "multilabel"
              else np.asarray(real.labels).sum(0).tolist())
    added = f" + {len(train_ds) - len(real)} synthetic" if len(train_ds) > len(real) else ""

    def evaluate(pred: dict[str, np.ndarray], threshold: Any = None) -> tuple[dict[str, float], None]:
        return classification_metrics(pred["probs"], pred["labels"], task, threshold=threshold), None

    def choose_threshold(val: dict[str, np.ndarray]) -> tuple[Any, str]:
        return operating_threshold(val["probs"], val["labels"], task, cfg.eval.threshold)

    def test_fields(pred: dict[str, np.ndarray], rows: None, threshold: Any) -> dict[str, Any]:
        return {"ci": bootstrap_ci(pred["probs"], pred["labels"], task, n_boot=cfg.n_bootstrap, seed=cfg.seed,
                                   threshold=threshold),
                "ci_method": f"percentile bootstrap over test cases, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
                "roc": roc_curves(pred["probs"], pred["labels"], task, class_names=ds["test"].class_names)}

    def save_outputs(out: Path, pred: dict[str, np.ndarray], threshold: Any) -> None:
        save_predictions(out / "predictions.npz", pred["probs"], index=pred["index"], labels=pred["labels"])

    return TaskParts(
        label_task=task, model=Classifier(enc.backbone, num_outputs, dropout=cfg.optim.dropout),
        datasets=ds, loaders=parts["loaders"],
        loss=lambda logits, batch: classification_loss(logits, batch["label"], task),
        predict=lambda model, loader: predict(model, loader, task, accelerator),
        evaluate=evaluate, choose_threshold=choose_threshold, test_fields=test_fields, save_outputs=save_outputs,
        val_columns=VAL_COLUMNS["classification"],
        budget=f"labels {cfg.data.label_fraction or 1.0:g} ({len(real)} train{added})",
        summary=f"{task}, {num_outputs} outputs", cases=f"{len(ds['test'])}",
        label_fraction=label_fraction(cfg), n_train_images=None,
        data={"dataset": cfg.data.dataset, "fingerprint": train_ds.fingerprint, "train_size": len(real),
              "val_size": len(ds["val"]), "test_size": len(ds["test"]), "class_names": train_ds.class_names,
              "train_class_counts": counts, "split": train_ds.split_info, **parts["data"]},
        model_meta={"class_names": train_ds.class_names, "image_size": enc.image_size},
    )


def multitask(cfg: FinetuneConfig, enc: Encoder, accelerator: Accelerator) -> TaskParts:
    """``tasks``: labelled images -> :class:`~medpretrain.regimes.MultiTaskClassifier`, one head per task on the
    shared backbone (:mod:`medpretrain.multitask`: weighted-sum loss, selection and headline metrics on the
    weighted mean of the task metrics, a threshold per task); each task's metrics and CIs over test cases."""
    parts = build_dataloaders(cfg, accelerator.num_processes)
    ds = parts["datasets"]
    train_ds = ds["train"]
    mt = MultiTask(resolve_tasks(cfg.tasks, train_ds.class_names, train_ds.task, cfg.data.dataset,
                                 [ds[s].labels for s in ("train", "val", "test")]))
    counts = mt.view_labels(train_ds.labels).sum(0).astype(int).tolist()  # positives per column

    def evaluate(pred: dict[str, np.ndarray], threshold: Any = None) -> tuple[dict[str, float], None]:
        return mt.evaluate(pred, threshold), None

    chosen: dict[str, Any] = {}  # choose_threshold (on validation) comes before test_fields: its val and rules

    def choose_threshold(val: dict[str, np.ndarray]) -> tuple[Any, str]:
        thresholds, rules = mt.choose_thresholds(val, cfg.eval.threshold)
        chosen.update(val=val, rules=rules)
        return thresholds, "per task: " + "; ".join(f"{n}: {r}" for n, r in rules.items())

    def test_fields(pred: dict[str, np.ndarray], rows: None, threshold: Any) -> dict[str, Any]:
        split, rules = mt.split_thresholds(threshold), chosen["rules"]
        # Each task's validation metrics: the selected checkpoint's, at the thresholds chosen on them.
        val_m, test_m = mt.task_metrics(chosen["val"], threshold), mt.task_metrics(pred, threshold)
        tasks = {t["name"]: {**{k: v for k, v in t.items() if k != "name"},
                             "metrics": {"test": test_m[t["name"]], "val_best": val_m[t["name"]]},
                             "ci": bootstrap_ci(pred[f"probs:{t['name']}"], pred[f"labels:{t['name']}"], t["kind"],
                                                n_boot=cfg.n_bootstrap, seed=cfg.seed, threshold=split[t["name"]]),
                             "threshold": split[t["name"]], "threshold_rule": rules[t["name"]]}
                 for t in mt.describe()}
        return {"ci": mt.bootstrap_mean(pred, threshold, n_boot=cfg.n_bootstrap, seed=cfg.seed),
                "ci_method": f"percentile bootstrap over test cases, n={cfg.n_bootstrap}, seed={cfg.seed}, 95% "
                             "(of the weighted mean over tasks; each task's over the same resamples)",
                "metric_protocol": PROTOCOL, "tasks": tasks,
                "roc": roc_curves(pred["probs"], pred["labels"], "multilabel", class_names=mt.view_names)}

    def save_outputs(out: Path, pred: dict[str, np.ndarray], threshold: Any) -> None:
        save_predictions(out / "predictions.npz", pred["probs"], index=pred["index"], labels=pred["labels"],
                         tasks={n: (pred[f"probs:{n}"], pred[f"labels:{n}"]) for n in mt.names})

    model = MultiTaskClassifier(enc.backbone, mt.outputs, dropout=cfg.optim.dropout)
    return TaskParts(
        label_task="multilabel", model=model, datasets=ds, loaders=parts["loaders"],
        loss=lambda logits, batch: mt.loss(logits, batch["label"]),
        predict=lambda model, loader: mt.predict(model, loader, accelerator),
        evaluate=evaluate, choose_threshold=choose_threshold, test_fields=test_fields, save_outputs=save_outputs,
        val_columns=(*VAL_COLUMNS["classification"], *mt.val_columns()),
        budget=f"labels {cfg.data.label_fraction or 1.0:g} ({len(train_ds)} train)",
        summary=f"{len(mt.tasks)} tasks ({', '.join(f'{t.name}: {t.kind} x{t.weight:g}' for t in mt.tasks)})",
        cases=f"{len(ds['test'])}", label_fraction=label_fraction(cfg), n_train_images=None,
        data={"dataset": cfg.data.dataset, "fingerprint": train_ds.fingerprint, "train_size": len(train_ds),
              "val_size": len(ds["val"]), "test_size": len(ds["test"]), "class_names": mt.view_names,
              "source_class_names": train_ds.class_names, "train_class_counts": counts, "split": train_ds.split_info},
        model_meta={"class_names": mt.view_names, "image_size": enc.image_size, "tasks": mt.describe()},
        multitask=mt,
    )


def segmentation(cfg: FinetuneConfig, enc: Encoder, accelerator: Accelerator) -> TaskParts:
    """Masks -> :class:`~medpretrain.unet.UNet` on the backbone; per-image metrics inside the roi."""
    parts = build_seg_dataloaders(cfg, accelerator.num_processes)
    ds = parts["datasets"]
    train_ds, test_ds = ds["train"], ds["test"]
    if train_ds.task != "segmentation":
        raise ConfigError(f"task=segmentation needs a mask dataset (e.g. drive:), got task {train_ds.task!r}")
    n_images = len(parts["chosen"])
    names = test_ds.names
    seg_model = build_seg_model(cfg.seg.model, enc.backbone, init=cfg.init, regime=cfg.regime,
                                full_resolution=cfg.seg.full_resolution)

    def evaluate(pred: dict[str, np.ndarray], threshold: Any = None) -> tuple[dict[str, float], list[dict[str, float]]]:
        rows = per_image_metrics(pred["probs"], pred["masks"], pred["rois"],
                                 threshold=cfg.seg.threshold if threshold is None else threshold, seed=cfg.seed)
        return mean_metrics(rows), rows

    def choose_threshold(val: dict[str, np.ndarray]) -> tuple[Any, str]:
        if cfg.seg.threshold_rule == "fixed":
            return cfg.seg.threshold, f"fixed {cfg.seg.threshold:g}"
        return dice_threshold(val["probs"], val["masks"], val["rois"]), "dice-maximising on validation (0.05..0.95)"

    def test_fields(pred: dict[str, np.ndarray], rows: list[dict[str, float]] | None, threshold: Any) -> dict[str, Any]:
        assert rows is not None
        return {"per_image": [{"name": names[int(i)] if names is not None else int(i), **r}
                              for i, r in zip(pred["index"], rows, strict=True)],
                "ci": bootstrap_images(rows, n_boot=cfg.n_bootstrap, seed=cfg.seed),
                "ci_method": f"percentile bootstrap over test images, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
                "metric_protocol": f"per-image pixel metrics inside the roi (threshold {threshold:g}, chosen on "
                                   "validation), mean over test images; pixel AUC on at most 200000 roi pixels "
                                   "per image"}

    def save_outputs(out: Path, pred: dict[str, np.ndarray], threshold: Any) -> None:
        save_overlays(out / "overlays.png", pred, test_ds, cfg.seg.n_overlays, threshold)
        save_predictions(out / "predictions.npz", pred["probs"], pred["masks"], pred["rois"], pred["index"],
                         [names[int(i)] for i in pred["index"]] if names is not None else None)

    return TaskParts(
        label_task="segmentation", model=seg_model, datasets=ds, loaders=parts["loaders"],
        loss=lambda logits, batch: seg_loss(logits, batch["mask"], cfg.seg.dice_loss_weight),
        predict=lambda model, loader: predict_images(model, loader, cfg, accelerator),
        evaluate=evaluate, choose_threshold=choose_threshold, test_fields=test_fields, save_outputs=save_outputs,
        val_columns=VAL_COLUMNS["segmentation"],
        budget=f"{n_images} annotated images", summary=f"segmentation, {cfg.seg.patch_size}px patches",
        cases=f"{len(test_ds)} images", label_fraction=n_images / len(train_ds), n_train_images=n_images,
        data={"dataset": cfg.data.dataset, "fingerprint": train_ds.fingerprint, "train_size": n_images,
              "train_pool_size": len(train_ds), "train_images": parts["chosen_names"], "val_size": len(ds["val"]),
              "test_size": len(test_ds), "image_size": enc.image_size, "patch_size": cfg.seg.patch_size,
              "split": train_ds.split_info},
        model_meta={"patch_size": cfg.seg.patch_size, "seg_model": cfg.seg.model,
                    "full_resolution": seg_model.full_resolution,
                    **({"arch": seg_model.backbone.arch} if cfg.seg.model != "unet" else {})},
    )


TASKS = {"classification": classification, "segmentation": segmentation}


def reuse_batch(val_ds: Any, cfg: FinetuneConfig) -> torch.Tensor | None:
    """The first ``eval.reuse_images`` validation images (segmentation: their centre ``seg.patch_size`` crops),
    the fixed batch of the feature-reuse analysis; ``None`` when it is off."""
    n = min(cfg.eval.reuse_images, len(val_ds))
    if n < 2:
        return None
    images = []
    for i in range(n):
        x = torch.as_tensor(val_ds[i]["image"])
        if cfg.task == "segmentation":
            p = cfg.seg.patch_size
            top, left = max(0, (x.shape[-2] - p) // 2), max(0, (x.shape[-1] - p) // 2)
            x = x[..., top:top + p, left:left + p]
        images.append(x)
    return torch.stack(images)


def augment_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The augmentation draws of global step ``step``: a function of (seed, step) only, so a resumed run
    draws what the uninterrupted one drew."""
    g = torch.Generator(device=device)
    return g.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1))


def train(cfg: FinetuneConfig, stage: Stage, requested_hash: str) -> RunResult:
    """Fine-tune for the step budget, select the best validation period, choose the threshold on validation,
    evaluate the test split once, write the outputs."""
    accelerator, out = stage.accelerator, stage.run_dir
    t_run = time.perf_counter()
    regime = parse_regime(cfg.regime)
    seed_everything(cfg.seed)
    source = read_source(cfg.data)
    enc = build_encoder(cfg, int(np.asarray(source.images[0]).shape[-1]))
    for w in enc.warnings:  # cfg now holds the checkpoint's data options: config.yaml (stage.begin) records them
        accelerator.print(f"warning: {w}")

    parts = TASKS[cfg.task](cfg, enc, accelerator)
    apply_memory_format(parts.model, cfg.backbone.memory_format)  # auto: channels_last for depthwise convs
    # The regimes act on model.backbone (the U-Net's encoder; its decoder always trains at optim.lr).
    optimizer, scheduler, regime_info = build_optimizer(parts.model, regime, cfg, enc.stem)
    # ---- frozen read-outs (medpretrain.probe, issue 14 item 1) ---------------------------------------------
    # linear / knn on classification: BN re-estimated, a read-out fitted on cached features, no training loop.
    if probe.is_readout(cfg.task, regime):
        return probe.run_probe(cfg, stage, parts, enc, regime, regime_info, requested_hash=requested_hash,
                               t_run=t_run)
    # Any other frozen part (freeze:<k>, a segmentation linear encoder): its BN statistics re-estimated on the
    # training images first (nothing happens for full / reinit).
    # Real images only (data.synthetic's images train the layers, they do not set frozen statistics).
    probe.reestimate_frozen_bn(parts.model, real_images(parts.loaders["train"].dataset), accelerator.device,
                               batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                               regime_info=regime_info)
    # ---- end of frozen read-outs ---------------------------------------------------------------------------
    # Feature reuse (medpretrain.transfer): the backbone as training starts, and a fixed validation batch.
    reuse_images = reuse_batch(parts.datasets["val"], cfg)
    initial = transfer.snapshot(parts.model.backbone) if reuse_images is not None else None
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        parts.model, optimizer, parts.loaders["train"], parts.loaders["val"], parts.loaders["test"]
    )
    step_sampler = parts.loaders["train"].batch_sampler if cfg.optim.steps > 0 else None  # StepBatches
    budget = budget_of(cfg.optim, len(train_loader))
    augment = TrainAugment(cfg.optim.augment, mean=cfg.data.mean, std=cfg.data.std)
    progress = Progress()
    ckpt_state = {"scheduler": scheduler, "progress": progress}  # saved without pickle (save_checkpoint)
    # Checkpoints are per period (marker step = period, the "epoch" column); begin() restores them and drops
    # later metric rows.
    if stage.begin(ckpt_state):
        accelerator.print(f"resumed from {stage.resume_from} after epoch {progress.epoch}")
        if progress.epoch > budget.periods:  # a larger budget extends a run; a smaller one cannot shrink it
            raise ConfigError(f"{stage.resume_from}: the checkpoint is after period {progress.epoch} of a longer "
                              f"run, but this config's budget has {budget.periods} ({budget.total_steps} steps); "
                              "resume it with its own settings, or start a new output_dir")
    best_path = out / "best_model.safetensors"
    unwrapped = accelerator.unwrap_model(model)
    headline, label = parts.headline, METRIC_LABELS[parts.headline]
    accelerator.print(f"{cfg.init} / {regime} / {parts.budget} / seed {cfg.seed}: {parts.summary}, "
                      f"{regime_info.trainable_params} trainable params, {budget.total_steps} steps "
                      f"(validation every {budget.period_steps}), augment {cfg.optim.augment}")

    # Global step count (loss guard, fault hook, results): a resumed run continues from its finished periods.
    step = budget.steps_before(progress.epoch + 1)
    for epoch in range(progress.epoch + 1, budget.periods + 1):
        t0 = time.perf_counter()
        model.train()
        if step_sampler is not None:
            step_sampler.period = epoch  # the batches of steps [(epoch - 1) * eval_every, epoch * eval_every)
        elif hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        total, count = torch.zeros((), device=accelerator.device), 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not accelerator.is_local_main_process)
        for i, batch in enumerate(bar):
            if i >= budget.period_steps:  # epochs mode: optim.max_steps_per_epoch
                break
            if augment.active:
                batch = augment(batch, augment_generator(cfg.seed, step, accelerator.device))
            with accelerator.accumulate(model):
                loss = parts.loss(model(batch["image"]), batch)
                stage.guard.update(loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
                if budget.in_steps and accelerator.sync_gradients:
                    scheduler.step()  # the schedule is defined in optimiser steps
            step += 1
            fault_hook(step)  # test-only: MEDPRETRAIN_FAULT_EXIT_AT_STEP kills the run mid-epoch
            total += loss.detach() * len(batch["image"])
            count += len(batch["image"])
        if not budget.in_steps:
            scheduler.step()
        stage.check_finite()
        train_loss = float(accelerator.gather(total.reshape(1)).sum()) / max(1, count * accelerator.num_processes)

        val_m, _ = parts.evaluate(parts.predict(model, val_loader))
        epoch_s = time.perf_counter() - t0
        val_row = {f"val_{c}": val_m[c] for c in parts.val_columns}
        row = {"epoch": epoch, "train_loss": train_loss, **val_row, "lr": lr, "epoch_s": epoch_s, "step": step}
        improved, stop = progress.record(row, val_m, val_m[headline], cfg.optim.patience)
        if improved and accelerator.is_main_process:
            save_state_dict(best_path, unwrapped.state_dict(), {"epoch": epoch, f"val_{headline}": val_m[headline]})
        stage.log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        accelerator.print(f"epoch {epoch}/{budget.periods} step {step} loss {train_loss:.4f} val "
                          + " ".join(f"{METRIC_LABELS.get(c, c)} {val_m[c]:.4f}" for c in parts.val_columns)
                          + f" lr {lr:.1e} {epoch_s:.1f}s" + (" *" if improved else ""))
        accelerator.wait_for_everyone()
        stage.checkpoint(epoch, ckpt_state)
        if stop:
            accelerator.print(f"early stopping: no better validation {label} for {cfg.optim.patience} validations")
            break

    # Model selection is over: load the best-validation weights and touch the test split once.
    if not best_path.exists():
        raise RuntimeError(f"{best_path} is missing: no epoch produced a finite validation {label} (or the file "
                           "was removed after a finished run; resume needs keep_checkpoints=true)")
    state, _ = load_state_dict(best_path)
    load_exact(unwrapped, state, source=best_path)
    # The operating point is chosen on validation with the selected weights, then applied to test as it is.
    val = parts.predict(model, val_loader)
    threshold, rule = parts.choose_threshold(val)
    val_m, _ = parts.evaluate(val, threshold)
    test = parts.predict(model, test_loader)
    test_m, rows = parts.evaluate(test, threshold)
    fields = parts.test_fields(test, rows, threshold)
    if initial is not None and reuse_images is not None:
        fields["transfer"] = transfer.reuse_analysis(initial, unwrapped.backbone, reuse_images)
    result = complete_result(cfg, parts, enc, regime, regime_info, progress, test_m,
                             {**fields, "optimizer_steps": step, "threshold": threshold, "threshold_rule": rule},
                             requested_hash=requested_hash, t_run=t_run, accelerator=accelerator, out=out,
                             val_metrics=val_m)
    if accelerator.is_main_process:
        save_state_dict(out / "model.safetensors", unwrapped.state_dict(),
                        {"config": config_to_dict(cfg), "task": parts.label_task, "arch": cfg.backbone.arch,
                         "stem": enc.stem, "in_channels": cfg.data.channels, "mean": cfg.data.mean,
                         "std": cfg.data.std, "best_epoch": progress.best_epoch, "init": cfg.init,
                         **parts.model_meta})
        parts.save_outputs(out, test, threshold)
        write_results(out, result)
        if not cfg.keep_checkpoints:  # the best-epoch weights belong to the resume state
            shutil.rmtree(stage.ckpt_dir, ignore_errors=True)
            best_path.unlink(missing_ok=True)
    ci = fields["ci"][headline]
    accelerator.print(f"test ({parts.cases}): " + " ".join(f"{k} {v:.4f}" for k, v in test_m.items())
                      + f" | {label} 95% CI [{ci['low']:.4f}, {ci['high']:.4f}] | best epoch {progress.best_epoch}")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(FinetuneConfig, argv)
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not implemented; available: {sorted(TASKS)}")
    probe.check_regime(cfg.task, cfg.regime)  # fail on a bad regime (knn: classification only) before any work
    # Bad data fails here, before the run folder is touched (config.yaml of an earlier run stays); decoded
    # once per process: train() gets it from the cache.
    source = read_source(cfg.data)
    if cfg.task == "segmentation" and source.task != "segmentation":
        raise ConfigError(f"task=segmentation needs a mask dataset (e.g. data.dataset=drive:drive), "
                          f"{cfg.data.dataset!r} is not one")
    if cfg.tasks:  # labels the source lacks, or columns that are not one-hot: before the run folder too
        resolve_tasks(cfg.tasks, source.class_names, source.task, cfg.data.dataset,
                      [source.labels] if source.labels is not None else [])
    check_synthetic(cfg)  # a data.synthetic file that cannot be used: before the run folder too
    out = output_dir(cfg).resolve()
    requested_hash = run_hash(cfg)  # before the init checkpoint may adjust data options
    # The one stage start-up: a finished folder (results.json) or an existing one without resume=auto is
    # refused; the x axis of metrics.csv and of the checkpoints is the epoch; no trackers (metrics.csv only).
    stage = start_stage("finetune", cfg, out_dir=str(out.parent), run_name=out.name, resume=cfg.resume,
                        seed=cfg.seed, step_key="epoch", log_with=None, done_file="results.json",
                        folder_key="output_dir", resume_key="resume",
                        fields=["epoch", "train_loss", *(f"val_{c}" for c in VAL_COLUMNS[cfg.task]),
                                *(f"val_{task_name(t)}_auc" for t in cfg.tasks), "lr", "epoch_s", "step"],
                        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    accelerator = stage.accelerator
    try:
        train(cfg, stage, requested_hash)
    except InitUnavailable as e:
        # ImageNetUnavailable, or no pretraining export yet: the arm is reported as unavailable and is
        # never run with random weights instead.
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out)
            write_results(out, unavailable_result(cfg, str(e), requested_hash))
        accelerator.print(f"init '{cfg.init}' is unavailable: {e}\nwrote {out / 'results.json'} with status "
                          "'unavailable'; this arm is not run with random weights.")
        accelerator.end_training()
        return EXIT_UNAVAILABLE
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
