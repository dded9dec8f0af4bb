"""The one pretraining loop every self-supervised method runs through, written out top to bottom.

    accelerate launch pretrain/simclr.py train.epochs=5          # = main("simclr", [...])
    accelerate launch pretrain/train.py method=byol train.epochs=5

:func:`main` reads the method's config (its YAML, then ``key=value`` overrides), starts the stage
(:func:`medpretrain.stage.start_stage`: run folder, resume policy, accelerator), and then: data (the split
cached on the device, views made there by :class:`medpretrain.augment.BatchViews`), the method module
(:mod:`medpretrain.methods`), the optimizer (peak lr :func:`peak_lr`), ``stage.begin`` (resume), the loop
(accumulate, random patches at the data's resolution when ``train.patch_size`` > 0, two views, the method's
loss, momentum updates once per optimizer step, logging, checkpoints, kNN), and the export of the backbone
(``backbone.safetensors``, the contract checkpoint ``--init <method>`` finds).

Outputs in ``<out_dir>/<run_name>/``: ``backbone.safetensors``, ``config.yaml``, ``metrics.csv``, ``loss.png``,
``tb/``, ``checkpoints/``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from medpretrain.augment import BatchViews, random_patches
from medpretrain.backbones import apply_memory_format, build_backbone
from medpretrain.config import ConfigError, config_hash, load_config
from medpretrain.data import build_dataset
from medpretrain.data.loader import image_loader
from medpretrain.faults import fault_hook, inject_nan
from medpretrain.knn import KNNMonitor, knn_monitor
from medpretrain.methods.base import TrainConfig, method_spec
from medpretrain.methods.registry import stage as stage_info
from medpretrain.resume import Counter
from medpretrain.runlog import plot_curves
from medpretrain.schedules import fused, warmup_cosine
from medpretrain.stage import start_stage
from medpretrain.utils import PROJECT_ROOT

# knn_acc, then what makes it readable: balanced accuracy, AUC and the validation majority baseline
METRICS = ["step", "epoch", "loss", "lr", "images_per_s", "knn_acc", *KNNMonitor.REPORT_COLUMNS, "time_s"]


def peak_lr(t: TrainConfig, global_batch: int) -> float:
    """The peak learning rate of the schedule: ``train.lr`` scaled linearly from a global batch of 128
    (``train.lr_scaling=linear``, lightly's examples) or ``train.lr`` itself (``none``)."""
    return t.lr * global_batch / 128 if t.lr_scaling == "linear" else t.lr


def main(name: str, argv: list[str] | None = None) -> None:
    """Pretrain a backbone with the registered method ``name`` (config keys: ``<name>.*``, ``train.*`` ...)."""
    spec, info = method_spec(name), stage_info(name)
    cfg: Any = load_config(spec.config, argv, defaults_file=PROJECT_ROOT / info.config)
    t = cfg.train
    stage = start_stage(name, cfg, out_dir=cfg.out_dir, run_name=cfg.run_name, resume=t.resume, seed=t.seed,
                        fields=METRICS, mixed_precision=t.mixed_precision, grad_accum=t.grad_accum,
                        checkpoint_total_limit=t.checkpoint_total_limit)
    accelerator = stage.accelerator

    # ---- data: unlabeled pretraining images in [0, 1]; views are normalised on the device ----
    ds = build_dataset(cfg.data, cfg.split, unlabeled=True, normalize=False)
    source_hw = tuple(int(v) for v in ds[0]["image"].shape[-2:])
    if t.patch_size > min(source_hw):
        raise ConfigError(f"train.patch_size={t.patch_size} does not fit the {source_hw[1]}x{source_hw[0]} images of "
                          f"{ds.spec}")
    # Patch pretraining: views are built from patches, so the network runs at (and exports) the patch size.
    image_size = t.patch_size or source_hw[-1]
    loader, sampler_gen, to_images = image_loader(ds, t.batch_size, t.cache_on_device, accelerator.device,
                                                  cfg.data.num_workers)
    views = BatchViews(cfg.aug, size=image_size, mean=cfg.data.mean, std=cfg.data.std)
    monitor = knn_monitor(cfg.data, t.knn_split, t.knn_k, t.knn_t, t.knn_every)

    # ---- model (backbone + the method's heads, momentum copies and loss), optimizer ----
    backbone = build_backbone(cfg.backbone.arch, cfg.data.channels, cfg.backbone.stem, image_size=image_size)
    model: Any = spec.method(backbone, getattr(cfg, name), processes=accelerator.num_processes)
    model.check_data(len(ds))  # options that cannot work on this many images fail before any step
    if t.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # train.channels_last forces the layout; otherwise backbone.memory_format decides (auto: depthwise convs).
    channels_last = apply_memory_format(model, "channels_last" if t.channels_last else cfg.backbone.memory_format)
    params = [p for p in model.parameters() if p.requires_grad]  # momentum copies move by momentum only
    global_batch = t.batch_size * t.patches_per_image * accelerator.num_processes * t.grad_accum  # views per step
    base_lr = peak_lr(t, global_batch)
    optimizer: torch.optim.Optimizer
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                    fused=fused(params))
    else:
        optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=t.weight_decay, fused=fused(params))
    if t.compile:
        model = torch.compile(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    method = accelerator.unwrap_model(model)
    steps_per_epoch = len(loader) // t.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has {len(loader)} batches, fewer than train.grad_accum={t.grad_accum}")
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- resume: the newest complete checkpoint into the prepared objects and our own state ----
    step = Counter()  # optimizer steps done
    state = {"step": step, **method.checkpoint_state()}  # saved without pickle (medpretrain.resume)
    stage.begin(state, step)
    if stage.resume_from is not None:
        accelerator.print(f"resumed from {stage.resume_from} at step {step.value}/{total_steps}")
    patches = (f"{t.patches_per_image} random {t.patch_size} px patch(es) per image of {source_hw[1]}x{source_hw[0]}"
               if t.patch_size else f"{image_size} px")
    accelerator.print(f"{method.title}: {len(ds)} images ({ds.spec}, split {cfg.split}), {patches}, "
                      f"{cfg.backbone.arch}/{backbone.stem}, global batch {global_batch}, {total_steps} steps, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}, peak lr {base_lr:.3g} "
                      f"({t.lr_scaling}); run folder {stage.run_dir} "
                      f"(config {config_hash(cfg)})")

    def run_knn(epoch: int) -> float | None:
        acc = None
        if monitor is not None and accelerator.is_main_process:
            acc = monitor(method.backbone, accelerator.device)
            stage.log({"epoch": epoch, "knn_acc": acc, **monitor.columns()}, step.value)
        accelerator.wait_for_everyone()
        return acc

    if step.value == 0 and monitor is not None:
        run_knn(0)  # the random-init baseline, so the curve shows whether features improve
    aug_gen = torch.Generator(device=accelerator.device)
    bar = stage.progress(total_steps, step.value)
    t_window, n_window, s_window, t0 = time.perf_counter(), 0, 0, time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device)

    # ---- the training loop ----
    model.train()
    start_epoch = step.value // steps_per_epoch
    for epoch in range(start_epoch, epochs):
        sampler_gen.manual_seed(t.seed * 100_003 + epoch)  # same order on replay and after resume
        skip = (step.value - epoch * steps_per_epoch) * t.grad_accum
        batches = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        for i, batch in enumerate(batches, start=skip):
            if step.value >= total_steps:
                break
            lr = warmup_cosine(step.value, total_steps, base_lr, t.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.accumulate(model):
                images = to_images(batch)
                # Per-process, per-micro-batch seed: views differ across processes and are replayed exactly on resume.
                aug_gen.manual_seed((t.seed << 40) + (accelerator.process_index << 32) + epoch * len(loader) + i)
                if t.patch_size:  # drawn from the same generator: replayed exactly on resume too
                    images, _ = random_patches(images, t.patch_size, t.patches_per_image, generator=aug_gen)
                x0, x1 = views.pair(images, generator=aug_gen)
                if channels_last:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                    x1 = x1.contiguous(memory_format=torch.channels_last)
                if accelerator.sync_gradients:  # once per optimizer step: momentum updates, schedules
                    method.before_step(step.value, total_steps)
                with accelerator.autocast():
                    loss = model(x0, x1)
                loss = inject_nan(step.value + 1, loss)
                stage.guard.update(loss, step.value + 1)
                accelerator.backward(loss)
                method.on_after_backward(step.value)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / t.grad_accum
            n_window += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step.value += 1
            s_window += 1
            bar.update(1)
            if step.value % t.log_every == 0 or step.value == total_steps:
                stage.check_finite()
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / s_window
                loss_sum.zero_()
                rate = n_window / (time.perf_counter() - t_window)
                t_window, n_window, s_window = time.perf_counter(), 0, 0
                stage.log({"epoch": epoch, "loss": mean_loss, "lr": lr, "images_per_s": rate,
                           "time_s": time.perf_counter() - t0}, step.value)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            if t.checkpoint_every > 0 and step.value % t.checkpoint_every == 0 and step.value < total_steps:
                stage.checkpoint(step.value, state)  # checks the loss guard first: never checkpoint garbage
            fault_hook(step.value)
        if t.knn_every > 0 and (epoch + 1) % t.knn_every == 0 and step.value < total_steps:
            run_knn(epoch + 1)
    bar.close()
    stage.check_finite()

    # ---- export ----
    knn_final = run_knn(epochs) if monitor is not None else None
    if accelerator.is_main_process:
        out = stage.export_backbone(method.backbone, ds, name, image_size, steps=step.value, epochs=epochs,
                                    extra={"knn_acc": knn_final, **(monitor.columns() if monitor else {}),
                                           "processes": accelerator.num_processes})
        run_dir = stage.run_dir
        plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", ("loss", "knn_acc", "knn_balanced_acc"),
                    title=f"{method.title} {run_dir.name}")
        accelerator.print(f"backbone: {out}\nplots:    {run_dir / 'loss.png'}\nmetrics:  {run_dir / 'metrics.csv'}"
                          + (f"\nkNN accuracy (val): {knn_final:.4f} (balanced {monitor.last['balanced_accuracy']:.4f}, "
                             f"AUC {monitor.last['auc']:.4f}; majority baseline {monitor.last['majority_baseline']:.4f})"
                             if knn_final is not None and monitor is not None else ""))
    stage.finish()
