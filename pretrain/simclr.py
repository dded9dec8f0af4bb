"""SimCLR pretraining of a medpretrain backbone on in-domain scans, with Accelerate.

    accelerate launch pretrain/simclr.py                                   # configs/simclr.yaml defaults
    accelerate launch pretrain/simclr.py train.epochs=5 data.image_size=64 train.mixed_precision=bf16
    accelerate launch pretrain/simclr.py train.resume=auto                 # continue an interrupted run

SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709) wired from lightly's parts as in lightly's
examples: backbone -> ``SimCLRProjectionHead`` -> ``NTXentLoss``. With several processes the negatives
are gathered across processes *with* gradients (``NTXentLoss(gather_distributed=True)``, lightly's
``GatherLayer``); ``accelerator.gather`` carries no gradient and would silently train on local
negatives' gradients only. Views are made on the training device by :class:`medpretrain.augment.BatchViews`.

Outputs in ``runs/pretrain/simclr/<run_name>/``: ``backbone.safetensors`` (the contract checkpoint that
``finetune/run.py --init selfsup`` finds), ``config.yaml``, ``metrics.csv``, ``loss.png``, ``tb/``,
``checkpoints/``.

Finding the export later: ``finetune/run.py --init selfsup`` (or ``--init simclr`` / ``--init moco``)
takes the newest ``backbone.safetensors`` under ``runs/`` whose metadata says ``method`` simclr or moco
(and the requested arch), newest by the export time written into the file (``meta.created``), see
``medpretrain.init.find_latest_export``. An explicit path (``--init runs/pretrain/simclr/<run>/backbone.safetensors``)
always wins. ``train.resume=auto`` continues the newest run under ``out_dir`` that has a complete
checkpoint but no export yet (or the run named by ``run_name``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads wait
# on descheduled peers and small batched ops slow down many-fold (measured: the cbr_tiny SimCLR step went
# from 6 to 250 images/s on a loaded 2-core machine). Must be set before torch loads libgomp; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from accelerate import Accelerator
from accelerate.utils import set_seed
from common import (
    TrainConfig,
    export_backbone,
    fault_hook,
    flat_config,
    image_loader,
    inject_nan,
    knn_monitor,
    resolve_run_dir,
)
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from tqdm.auto import tqdm

from medpretrain.augment import AugmentConfig, BatchViews
from medpretrain.backbones import build_backbone
from medpretrain.config import BackboneConfig, DataConfig, config_hash, load_config, save_config
from medpretrain.data import build_dataset
from medpretrain.training import (
    Counter,
    CSVLogger,
    FiniteGuard,
    NonFiniteLossError,
    checkpoint_step,
    load_checkpoint,
    plot_curves,
    prepare_resume,
    project_configuration,
    resolve_resume,
    save_checkpoint,
    warmup_cosine,
)

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "simclr.yaml"


@dataclasses.dataclass
class SimCLRMethodConfig:
    hidden_dim: int = 512
    """Projection head hidden width (lightly's examples use the backbone width for ResNet-18)."""
    output_dim: int = 128
    temperature: float = 0.5
    """NT-Xent temperature (SimCLR: 0.5 for batch sizes around 128-512)."""


@dataclasses.dataclass
class SimCLRConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    aug: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    simclr: SimCLRMethodConfig = dataclasses.field(default_factory=SimCLRMethodConfig)
    split: str = "train"
    """Pretraining images: ``train`` or ``all`` (train + val); never the test split. Labels unused."""
    out_dir: str = "runs/pretrain/simclr"
    run_name: str = ""
    """Run folder name; empty = a timestamp."""


class SimCLR(nn.Module):
    """Backbone + projection head: lightly's SimCLR example, with a contract backbone."""

    def __init__(self, backbone: nn.Module, hidden_dim: int, output_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(SimCLRConfig, argv, defaults_file=DEFAULTS)
    if cfg.split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all' (never test), got {cfg.split!r}")
    t = cfg.train
    run_dir, existing = resolve_run_dir(cfg.out_dir, cfg.run_name, t.resume)
    # Under torchrun on a machine without a GPU, accelerate only forms a process group (MULTI_CPU, gloo)
    # when told cpu=True; otherwise every process silently trains alone on its own copy.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard",
        project_config=project_configuration(run_dir, t.checkpoint_total_limit),
    )
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate formed a group of {accelerator.num_processes}")
    set_seed(t.seed)

    # ---- data: unlabeled pretraining images in [0, 1]; views are normalised on the device ----
    ds = build_dataset(cfg.data, cfg.split, unlabeled=True, normalize=False)
    image_size = int(ds[0]["image"].shape[-1])
    loader, sampler_gen, to_images = image_loader(ds, t.batch_size, t.cache_on_device, accelerator.device,
                                                  cfg.data.num_workers)
    views = BatchViews(cfg.aug, size=image_size, mean=cfg.data.mean, std=cfg.data.std)
    monitor = knn_monitor(cfg.data, t.knn_split, t.knn_k, t.knn_t, t.knn_every)

    # ---- model, loss, optimizer (lightly's SimCLR example) ----
    backbone = build_backbone(cfg.backbone.arch, cfg.data.channels, cfg.backbone.stem, image_size=image_size)
    model = SimCLR(backbone, cfg.simclr.hidden_dim, cfg.simclr.output_dim)
    if t.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=cfg.simclr.temperature, gather_distributed=True)
    global_batch = t.batch_size * accelerator.num_processes * t.grad_accum
    base_lr = t.lr * global_batch / 128
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=t.weight_decay)
    if t.compile:
        model = torch.compile(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step = Counter()  # optimizer steps done; checkpointed with the rest of the state
    ckpt_state = {"step": step}  # saved without pickle (medpretrain.training.save_checkpoint)

    steps_per_epoch = len(loader) // t.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(loader)} batches, fewer than grad_accum={t.grad_accum}")
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- resume ----
    ckpt_dir = run_dir / "checkpoints"
    if (run_dir / "backbone.safetensors").exists():
        raise FileExistsError(f"{run_dir} already finished (backbone.safetensors exists); pick another run_name")
    resume_from = resolve_resume(t.resume, ckpt_dir) if existing else None
    prepare_resume(accelerator, ckpt_dir)
    last_ckpt: Path | None = None
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, ckpt_state)
        if step.value != checkpoint_step(resume_from):
            raise RuntimeError(f"{resume_from}: step counter {step.value} != marker {checkpoint_step(resume_from)}")
        last_ckpt = resume_from
        accelerator.print(f"resumed from {resume_from} at step {step.value}/{total_steps}")
    elif (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"{run_dir} holds a run without a complete checkpoint to resume; pick another run_name")
    metrics = CSVLogger(run_dir / "metrics.csv",
                        ["step", "epoch", "loss", "lr", "images_per_s", "knn_acc", "time_s"])
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
        metrics.truncate_after(step.value)
    accelerator.init_trackers("simclr", config=flat_config(cfg))
    accelerator.print(f"SimCLR: {len(ds)} images ({ds.spec}, split {cfg.split}), {image_size} px, "
                      f"{cfg.backbone.arch}/{backbone.stem}, global batch {global_batch}, {total_steps} steps, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}; run folder {run_dir} "
                      f"(config {config_hash(cfg)})")

    def run_knn(epoch: int) -> float | None:
        acc = None
        if monitor is not None and accelerator.is_main_process:
            acc = monitor(accelerator.unwrap_model(model).backbone, accelerator.device)
            accelerator.log({"knn_acc": acc}, step=step.value)
            metrics.log({"step": step.value, "epoch": epoch, "knn_acc": acc})
        accelerator.wait_for_everyone()
        return acc

    if step.value == 0 and monitor is not None:
        run_knn(0)  # the random-init baseline, so the curve shows whether features improve
    guard = FiniteGuard(accelerator.device)
    aug_gen = torch.Generator(device=accelerator.device)
    bar = tqdm(total=total_steps, initial=step.value, disable=not accelerator.is_local_main_process,
               desc="simclr", dynamic_ncols=True)
    t_window, n_window, s_window, t0 = time.perf_counter(), 0, 0, time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device)

    def check_guard() -> None:
        try:
            guard.check(last_ckpt, reduce=lambda f: accelerator.gather(f).max())
        except NonFiniteLossError as err:
            accelerator.print(f"ERROR: {err}")
            accelerator.end_training()
            raise

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
                x0, x1 = views.pair(images, generator=aug_gen)
                x = torch.cat([x0, x1])  # one forward: BN statistics over both views, as SimCLR does
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with accelerator.autocast():
                    z0, z1 = model(x).float().chunk(2)
                    loss = criterion(z0, z1)
                loss = inject_nan(step.value + 1, loss)
                guard.update(loss, step.value + 1)
                accelerator.backward(loss)
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
                check_guard()
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / s_window
                loss_sum.zero_()
                rate = n_window / (time.perf_counter() - t_window)
                t_window, n_window, s_window = time.perf_counter(), 0, 0
                row = {"step": step.value, "epoch": epoch, "loss": mean_loss, "lr": lr, "images_per_s": rate,
                       "time_s": time.perf_counter() - t0}
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step.value)
                if accelerator.is_main_process:
                    metrics.log(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            if t.checkpoint_every > 0 and step.value % t.checkpoint_every == 0 and step.value < total_steps:
                check_guard()  # never checkpoint garbage
                last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
            fault_hook(step.value)
        if t.knn_every > 0 and (epoch + 1) % t.knn_every == 0 and step.value < total_steps:
            run_knn(epoch + 1)
    bar.close()
    check_guard()

    # ---- export ----
    knn_final = run_knn(epochs) if monitor is not None else None
    if accelerator.is_main_process:
        out = export_backbone(run_dir / "backbone.safetensors", accelerator.unwrap_model(model).backbone, cfg, ds,
                              "simclr", image_size, steps=step.value, epochs=epochs,
                              extra={"knn_acc": knn_final, "processes": accelerator.num_processes})
        plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", ("loss", "knn_acc"), title=f"SimCLR {run_dir.name}")
        accelerator.print(f"backbone: {out}\nplots:    {run_dir / 'loss.png'}\nmetrics:  {run_dir / 'metrics.csv'}"
                          + (f"\nkNN accuracy (val): {knn_final:.4f}" if knn_final is not None else ""))
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
