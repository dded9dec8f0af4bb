"""A small DDPM (Ho et al. 2020) from diffusers: ``accelerate launch generative/ddpm.py [key=value ...]``.

``UNet2DModel`` (:func:`medpretrain.generative.ddpm.build_ddpm_unet`) trained to predict the noise added by a
``DDPMScheduler`` at a uniformly drawn timestep (the paper's simplified loss). Grids and
``generative/sample.py`` use deterministic DDIM sampling (Song et al. 2021, eta = 0) with
``sample_steps`` steps, so sampling is seeded and reproducible. An exponential moving average of the
weights (diffusers' ``EMAModel`` with warm-up, ``ema_decay``; 0: off) is updated after every optimizer step,
checkpointed with the run, and is what the grids and ``unet.safetensors`` hold (its metadata says
``ema_decay``).

``conditional=true`` (a labelled source) learns p(x | class) the way diffusers intends:
``UNet2DModel(num_class_embeds=K)`` and ``class_labels=`` in its forward; ``class_dropout`` > 0 replaces that
fraction of the training labels by a learned null class, so the grids and ``sample.py`` can use
classifier-free guidance (``guidance_scale``, Ho & Salimans 2022). ``unet.safetensors`` then records
``num_classes`` and ``class_names`` (``sample.py per_class=<n>``); the grids cycle through the classes.

No backbone is exported: the UNet is not a registered backbone architecture, so ``--init`` cannot use it;
this generator only synthesises scans (the registry's generator-only stage ``ddpm``: an experiment lists it
under ``audit.generators``, never under a grid's ``inits``). Outputs under ``out_dir/<run_name>/``:
``unet.safetensors``, ``config.yaml``, ``metrics.csv``, ``loss.png``, ``samples_epochXXX.png``,
``results.json``, ``checkpoints/``.

    accelerate launch generative/ddpm.py                       # configs/ddpm.yaml
    accelerate launch generative/ddpm.py train.max_steps=2000 ema_decay=0.9995
    python generative/sample.py --model runs/generative/ddpm/<run> --n 100 --out samples/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from medpretrain.config import load_config
from medpretrain.faults import inject_nan
from medpretrain.generative.conditioning import grid_labels
from medpretrain.generative.configs import DDPMConfig
from medpretrain.generative.ddpm import averaged, build_ddpm_unet, build_ema, ddpm_meta, ddpm_sample
from medpretrain.generative.stage import Steps, optimizer_step, start_generative, train_data, write_outputs
from medpretrain.images import save_grid
from medpretrain.schedules import fused

METHOD = "ddpm"
MODEL_FILE = "unet.safetensors"  # no backbone: this file marks a finished run
FIELDS = ["step", "epoch", "loss", "elapsed_s"]
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "ddpm.yaml"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(DDPMConfig, argv, defaults_file=DEFAULTS)
    stage = start_generative(METHOD, cfg, FIELDS, done_file=MODEL_FILE)
    accelerator, tc = stage.accelerator, cfg.train

    data = train_data(stage, cfg)
    unet = build_ddpm_unet(data.image_size, data.ds.in_channels, cfg.base_channels, data.num_classes,
                           null_class=cfg.class_dropout > 0)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused(params))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, data.loader)
    ema = build_ema(accelerator.unwrap_model(unet), cfg.ema_decay, cfg.ema_power)  # None when ema_decay=0

    steps = Steps(stage, tc, loader, data.sampler_gen)
    if steps.begin({"ema": ema} if ema is not None else {}):
        accelerator.print(f"resumed from {stage.resume_from} at step {steps.value}")
    if ema is not None:
        ema.to(accelerator.device)  # a resume reads the average back on the CPU
    accelerator.print(f"DDPM on {cfg.data.dataset} ({len(data.ds)} images, {data.image_size} px), "
                      f"{steps.total} steps -> {stage.run_dir}")
    meta = ddpm_meta(accelerator.unwrap_model(unet), cfg.num_train_timesteps, cfg.beta_schedule, cfg.sample_steps,
                     cfg.ema_decay, data.class_names, cfg.guidance_scale)
    grid_y = grid_labels(tc.grid_size, data.num_classes)  # None unless conditional: the grid cycles the classes
    for _, batches in steps.epochs():
        unet.train()
        for batch in batches:
            x = data.to_images(batch)
            noise_gen = steps.noise()  # a resume replays the same noise and timesteps
            noise = torch.randn(x.shape, generator=noise_gen, device=x.device)
            t = torch.randint(0, cfg.num_train_timesteps, (x.shape[0],), generator=noise_gen, device=x.device)
            noisy = scheduler.add_noise(x, noise, t)
            y = data.to_labels(batch)  # None unless conditional
            if y is not None and cfg.class_dropout > 0:  # classifier-free guidance: some labels become the null class
                drop = torch.rand(y.shape, generator=noise_gen, device=y.device) < cfg.class_dropout
                y = torch.where(drop, torch.full_like(y, data.num_classes), y)
            with accelerator.autocast():
                loss = F.mse_loss(unet(noisy, t, class_labels=y).sample.float(), noise)
            loss = inject_nan(steps.value + 1, loss)
            optimizer_step(accelerator, loss, optimizer, unet.parameters(), cfg.grad_clip)
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            steps.advance(loss)
            if steps.log_due():
                steps.log({"loss": loss.item()})
                steps.bar.set_postfix(loss=f"{loss.item():.4f}")
            if steps.after_step():
                break
        if steps.samples_due():
            model = averaged(accelerator.unwrap_model(unet), ema)
            save_grid(ddpm_sample(model, tc.grid_size, tc.seed, meta, labels=grid_y), steps.samples_path())

    steps.finish()
    results: dict[str, Any] = {}
    if stage.is_main:
        model = averaged(accelerator.unwrap_model(unet), ema)
        samples = ddpm_sample(model, 128, tc.seed + 1, meta, labels=grid_labels(128, data.num_classes))
        results = write_outputs(stage, steps, data, MODEL_FILE, model, meta, samples, ("loss",), "DDPM",
                                ema_decay=cfg.ema_decay)
        accelerator.print(f"exported {stage.run_dir / MODEL_FILE}" + (" (moving average)" if ema is not None else ""))
    stage.finish()
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
