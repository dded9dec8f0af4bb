"""VAE pretraining whose encoder is the project's backbone: ``accelerate launch generative/vae.py [key=value ...]``.

Encoder = ``build_backbone(backbone.arch)`` + Gaussian head, decoder = upsample/conv stack
(:mod:`medpretrain.generative.vae`). Loss = summed reconstruction error + beta(step) * KL (+ optional
perceptual term through a frozen feature extractor). Exports, under ``out_dir/<run_name>/``:

* ``backbone.safetensors``: the encoder trunk as a contract backbone (``meta.method = "vae"``), so
  ``finetune/run.py --init vae`` can start from it;
* ``decoder.safetensors``: the decoder (``generative/sample.py --model`` draws images from it);
* ``config.yaml``, ``metrics.csv``, ``loss.png``, ``samples_epochXXX.png``, ``results.json``
  (validation reconstruction MSE / PSNR on the [0, 1] scale, sample statistics), ``checkpoints/``.

Examples::

    accelerate launch generative/vae.py configs/vae.yaml
    accelerate launch generative/vae.py configs/vae.yaml train.max_steps=20 run_name=smoke
    accelerate launch generative/vae.py configs/vae.yaml run_name=smoke train.resume=auto
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from medpretrain.backbones import build_backbone, resolve_stem
from medpretrain.config import load_config
from medpretrain.faults import inject_nan
from medpretrain.generative.configs import VAEConfig
from medpretrain.generative.sampling import generate, generator_meta, latent_noise
from medpretrain.generative.stage import (
    Steps,
    load_split,
    optimizer_step,
    start_generative,
    train_data,
    write_outputs,
)
from medpretrain.generative.vae import (
    VAE,
    BetaSchedule,
    ConvDecoder,
    PerceptualLoss,
    kl_divergence,
    reconstruction_loss,
)
from medpretrain.images import save_grid

METHOD = "vae"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "vae.yaml"
FIELDS = ["step", "epoch", "loss", "recon", "kl", "beta", "perceptual", "val_mse", "val_psnr", "elapsed_s"]


def build_model(cfg: VAEConfig, in_channels: int, image_size: int) -> VAE:
    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    encoder = build_backbone(cfg.backbone.arch, in_channels, stem, image_size=image_size)
    decoder = ConvDecoder(cfg.latent_dim, in_channels, image_size, cfg.decoder_channels)
    return VAE(encoder, decoder)


def build_perceptual(cfg: VAEConfig, in_channels: int, image_size: int) -> PerceptualLoss | None:
    if cfg.perceptual_weight <= 0:
        return None
    from medpretrain.init import init_backbone

    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    features, _ = init_backbone(cfg.perceptual_init, cfg.backbone.arch, in_channels, stem, image_size=image_size)
    return PerceptualLoss(features)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Reconstruction error on ``loader`` (z = mu), on the [0, 1] pixel scale: MSE and PSNR."""
    model.eval()
    errors = []
    for batch in loader:
        x = batch["image"]
        with accelerator.autocast():
            recon = model(x).recon
        per_image = ((recon.float() - x.float()) / 2).pow(2).flatten(1).mean(1)  # [-1, 1] -> [0, 1] scale
        errors.append(accelerator.gather_for_metrics(per_image))
    model.train()
    mse = float(torch.cat(errors).mean())
    return {"val_mse": mse, "val_psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(VAEConfig, argv, defaults_file=DEFAULTS)
    stage = start_generative(METHOD, cfg, FIELDS)
    accelerator, tc = stage.accelerator, cfg.train

    # Data: the whole split cached on the device; validation through a prepared loader.
    data = train_data(stage, cfg)
    val_ds, _ = load_split(cfg.data, "val")
    model = build_model(cfg, data.ds.in_channels, data.image_size)
    perceptual = build_perceptual(cfg, data.ds.in_channels, data.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, data.loader,
                                                               DataLoader(val_ds, batch_size=256))
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    beta_at = BetaSchedule(cfg.beta_schedule, cfg.beta, cfg.beta_warmup_steps, cfg.beta_cycle_steps)

    steps = Steps(stage, tc, loader, data.sampler_gen)
    if steps.begin():
        accelerator.print(f"resumed from {stage.resume_from} at step {steps.value}")
    accelerator.print(f"VAE {cfg.backbone.arch} on {cfg.data.dataset} ({len(data.ds)} images, {data.image_size} px), "
                      f"{steps.total} steps -> {stage.run_dir}")
    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)  # same latents in every grid
    decoder = accelerator.unwrap_model(model).decoder
    for epoch, batches in steps.epochs():
        model.train()
        for batch in batches:
            x = data.to_images(batch)
            beta = beta_at(steps.value)
            with accelerator.autocast():
                out = model(x, generator=steps.noise())
                recon = reconstruction_loss(out.recon, x, cfg.recon_loss)
                kl = kl_divergence(out.mu, out.logvar)
                loss = recon + beta * kl
                perc = perceptual(out.recon, x) if perceptual is not None else None
                if perc is not None:
                    loss = loss + cfg.perceptual_weight * perc
            loss = inject_nan(steps.value + 1, loss)
            optimizer_step(accelerator, loss, optimizer, model.parameters(), cfg.grad_clip)
            steps.advance(loss)
            if steps.log_due():
                row = {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "beta": beta,
                       "perceptual": perc.item() if perc is not None else None}
                steps.log(row)
                steps.bar.set_postfix(loss=f"{row['loss']:.1f}", kl=f"{row['kl']:.1f}")
            if steps.after_step():
                break

        # End of epoch: validation reconstruction and a sample grid from fixed latents.
        val = evaluate(model, val_loader, accelerator)
        steps.log(val, check=False)
        accelerator.print(f"epoch {epoch + 1}/{steps.num_epochs} step {steps.value}: "
                          f"val MSE {val['val_mse']:.4f}, PSNR {val['val_psnr']:.2f} dB")
        if steps.samples_due():
            save_grid(generate(decoder, fixed_z), steps.samples_path())

    # Finish: a last NaN check and checkpoint, then the exports.
    steps.finish()
    val = evaluate(model, val_loader, accelerator)
    results: dict[str, Any] = {}
    if stage.is_main:
        vae = accelerator.unwrap_model(model).eval()
        stage.export_backbone(vae.encoder, data.ds, METHOD, data.image_size, steps.value, steps.epoch + 1,
                              {"latent_dim": cfg.latent_dim, **val})
        results = write_outputs(stage, steps, data, "decoder.safetensors", vae.decoder,
                                generator_meta("vae_decoder", vae.decoder, cfg.decoder_channels),
                                generate(vae.decoder, latent_noise(512, cfg.latent_dim, tc.seed + 1)),
                                ("loss", "recon", "kl", "val_mse"), f"VAE {cfg.backbone.arch}", **val)
        accelerator.print(f"exported {stage.run_dir / 'backbone.safetensors'} and {stage.run_dir / 'decoder.safetensors'}")
    stage.finish()
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
