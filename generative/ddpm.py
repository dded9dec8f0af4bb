"""A small DDPM (Ho et al. 2020) from diffusers: ``accelerate launch generative/ddpm.py [key=value ...]``.

``UNet2DModel`` (:func:`medpretrain.generative.build_ddpm_unet`) trained to predict the noise added by a
``DDPMScheduler`` at a uniformly drawn timestep (the paper's simplified loss). Grids and
``generative/sample.py`` use deterministic DDIM sampling (Song et al. 2021, eta = 0) with
``sample_steps`` steps, so sampling is seeded and reproducible.

No backbone is exported: the UNet is not a registered backbone architecture, so ``--init`` cannot use it;
this generator only synthesises scans. Outputs under ``out_dir/<run_name>/``: ``unet.safetensors``,
``config.yaml``, ``metrics.csv``, ``loss.png``, ``samples_epochXXX.png``, ``results.json``, ``checkpoints/``.

    accelerate launch generative/ddpm.py train.max_steps=200
    python generative/sample.py --model runs/generative/ddpm/<run> --n 100 --out samples/
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from common import (
    GenTrainConfig,
    check_data_config,
    fault_hook,
    image_loader,
    inject_nan,
    load_split,
    resolve_run_dir,
    write_json,
)
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from medpretrain.checkpoint import save_state_dict
from medpretrain.config import ConfigError, DataConfig, config_to_dict, load_config, save_config
from medpretrain.distributed import check_world, cpu_group_needed
from medpretrain.generative import build_ddpm_unet, ddpm_meta, ddpm_sample, sample_statistics, save_grid
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
)

METHOD = "ddpm"
FIELDS = ["step", "epoch", "loss", "elapsed_s"]


@dataclasses.dataclass
class DDPMConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: GenTrainConfig = dataclasses.field(
        default_factory=lambda: GenTrainConfig(lr=2e-4, max_steps=100, batch_size=64, checkpoint_every=50))
    base_channels: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    sample_steps: int = 50
    """DDIM steps for grids and sample.py."""
    grad_clip: float = 1.0
    split: Literal["train", "all"] = "train"
    out_dir: str = "runs/generative/ddpm"
    run_name: str = ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(DDPMConfig, argv)
    check_data_config(cfg.data)
    tc = cfg.train
    run_dir, existing = resolve_run_dir(cfg.out_dir, cfg.run_name, tc.resume)
    if existing and not tc.resume:
        raise ConfigError(f"{run_dir} already exists: pass train.resume=auto to continue it, or a new run_name")
    accelerator = Accelerator(
        cpu=cpu_group_needed(),
        mixed_precision=tc.mixed_precision,
        log_with=None if tc.log_with == "none" else tc.log_with,
        project_config=project_configuration(run_dir, tc.checkpoint_total_limit),
    )
    check_world(accelerator)
    set_seed(tc.seed)

    train_ds, image_size = load_split(cfg.data, cfg.split)
    loader, sampler_gen, to_images = image_loader(train_ds, tc.batch_size, tc.cache_on_device,
                                                  accelerator.device, cfg.data.num_workers)
    unet = build_ddpm_unet(image_size, train_ds.in_channels, cfg.base_channels)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)

    steps_per_epoch = len(loader)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    step = Counter()
    ckpt_state = {"step": step}  # saved without pickle (medpretrain.training.save_checkpoint)

    ckpt_dir = run_dir / "checkpoints"
    metrics = CSVLogger(run_dir / "metrics.csv", FIELDS)
    if existing:
        prepare_resume(accelerator, ckpt_dir)
    last_ckpt = resolve_resume(tc.resume, ckpt_dir) if existing else None
    if last_ckpt is not None:
        load_checkpoint(accelerator, last_ckpt, ckpt_state)
        if accelerator.is_main_process:
            metrics.truncate_after(step.value)
        accelerator.print(f"resumed from {last_ckpt} at step {step.value}")
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
    accelerator.init_trackers("ddpm", config={"lr": tc.lr, "timesteps": cfg.num_train_timesteps})
    accelerator.print(f"DDPM on {cfg.data.dataset} ({len(train_ds)} images, {image_size} px), "
                      f"{total_steps} steps -> {run_dir}")

    guard = FiniteGuard(accelerator.device)

    def check_guard() -> None:
        try:
            guard.check(last_ckpt, reduce=lambda f: accelerator.gather(f).max())
        except NonFiniteLossError as err:
            accelerator.print(f"ERROR: {err}")
            accelerator.end_training()
            raise

    meta = ddpm_meta(accelerator.unwrap_model(unet), cfg.num_train_timesteps, cfg.beta_schedule, cfg.sample_steps)
    noise_gen = torch.Generator(device=accelerator.device)
    start = time.time()
    pbar = tqdm(total=total_steps, initial=step.value, desc="ddpm", disable=not accelerator.is_local_main_process)
    epoch = step.value // steps_per_epoch
    for epoch in range(step.value // steps_per_epoch, num_epochs):
        if step.value >= total_steps:
            break
        sampler_gen.manual_seed(tc.seed + epoch)
        skip = step.value - epoch * steps_per_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        unet.train()
        for batch in batches:
            x = to_images(batch)
            # Per-process, per-step seed (see vae.py): a resume replays the same noise and timesteps.
            noise_gen.manual_seed((tc.seed << 40) + (accelerator.process_index << 32) + step.value)
            noise = torch.randn(x.shape, generator=noise_gen, device=x.device)
            t = torch.randint(0, cfg.num_train_timesteps, (x.shape[0],), generator=noise_gen, device=x.device)
            noisy = scheduler.add_noise(x, noise, t)
            with accelerator.autocast():
                loss = F.mse_loss(unet(noisy, t).sample.float(), noise)
            loss = inject_nan(step.value + 1, loss)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step.value += 1
            guard.update(loss, step.value)
            pbar.update(1)
            if step.value % tc.log_every == 0 or step.value == total_steps:
                check_guard()
                accelerator.log({"loss": loss.item()}, step=step.value)
                pbar.set_postfix(loss=f"{loss.item():.4f}")
                if accelerator.is_main_process:
                    metrics.log({"step": step.value, "epoch": epoch, "loss": loss.item(),
                                 "elapsed_s": time.time() - start})
            if tc.checkpoint_every and step.value % tc.checkpoint_every == 0:
                check_guard()
                last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
            fault_hook(step.value)
            if step.value >= total_steps:
                break
        if accelerator.is_main_process and ((epoch + 1) % max(1, tc.sample_every) == 0 or step.value >= total_steps):
            grid = ddpm_sample(accelerator.unwrap_model(unet), tc.grid_size, tc.seed, meta)
            save_grid(grid, run_dir / f"samples_epoch{epoch + 1:03d}.png")
    pbar.close()

    check_guard()
    if last_ckpt is None or checkpoint_step(last_ckpt) != step.value:
        last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        save_state_dict(run_dir / "unet.safetensors", model.state_dict(),
                        {**meta, "method": METHOD, "dataset": train_ds.spec, "dataset_hash": train_ds.fingerprint,
                         "mean": cfg.data.mean, "std": cfg.data.std, "steps": step.value,
                         "config": config_to_dict(cfg)})
        val_ds, _ = load_split(cfg.data, "val")
        real = torch.stack([val_ds[i]["image"] for i in range(min(128, len(val_ds)))])
        samples = ddpm_sample(model, 128, tc.seed + 1, meta)
        plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", ("loss",), title="DDPM")
        results = {"method": METHOD, "steps": step.value, "epochs": epoch + 1, "image_size": image_size,
                   "train_wall_s": time.time() - start, "sample_stats": sample_statistics(samples, real),
                   "run_dir": str(run_dir)}
        write_json(run_dir / "results.json", results)
        accelerator.print(f"exported {run_dir / 'unet.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
