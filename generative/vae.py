"""VAE pretraining whose encoder is the project's backbone: ``accelerate launch generative/vae.py [key=value ...]``.

Encoder = ``build_backbone(backbone.arch)`` + Gaussian head, decoder = upsample/conv stack
(:mod:`medpretrain.generative.vae`). Loss = summed reconstruction error + beta(step) * KL, beta warmed up
linearly from 0 over ``beta_warmup_steps`` (KL warm-up, alias ``kl_warmup_steps``), and optional terms
against blur, each weighted per pixel: a feature distance through a frozen network (``perceptual_weight``;
``perceptual_init=random`` needs no download), ``1 - SSIM`` (``ssim_weight``) and the VAE-GAN term of a
patch discriminator judging reconstructions and prior samples against real images (``adversarial_weight``,
Larsen et al. 2016; hinge loss, spectral norm, its own Adam, from ``adversarial_start``).
``conditional=true`` (a labelled source) trains a conditional VAE (Sohn et al. 2015): a class embedding
joins the encoder's pooled features before the Gaussian head and another is concatenated to the latent for
the decoder (prior samples and grids take classes too; the grids cycle through them). Exports, under
``out_dir/<run_name>/``:

* ``backbone.safetensors``: the encoder trunk as a contract backbone (``meta.method = "vae"``; its
  ``extra`` holds the validation MSE / PSNR / SSIM), so ``finetune/run.py --init vae`` can start from it;
* ``decoder.safetensors``: the decoder (``generative/sample.py --model`` draws images from it; conditional:
  its metadata records ``num_classes`` and ``class_names``, ``sample.py per_class=<n>``);
* ``config.yaml``, ``metrics.csv`` (losses per step; ``val_mse``, ``val_psnr``, ``val_ssim`` per epoch),
  ``loss.png``, ``samples_epochXXX.png``, ``results.json`` (validation reconstruction MSE, PSNR and SSIM on
  the [0, 1] scale, sample statistics), ``checkpoints/``.

Examples::

    accelerate launch generative/vae.py configs/vae.yaml
    accelerate launch generative/vae.py configs/vae.yaml train.max_steps=20 run_name=smoke
    accelerate launch generative/vae.py configs/vae.yaml run_name=smoke train.resume=auto
    accelerate launch generative/vae.py configs/vae.yaml ssim_weight=0.5 adversarial_weight=0.05 adversarial_start=200
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
from medpretrain.generative.conditioning import grid_labels
from medpretrain.generative.configs import VAEConfig
from medpretrain.generative.dcgan import dataset_batches, gan_d_loss, gan_g_loss, reestimate_batchnorm
from medpretrain.generative.monitor import ssim
from medpretrain.generative.sampling import generate, generator_meta, latent_noise
from medpretrain.generative.stage import (
    Steps,
    TrainData,
    class_labels,
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
    PatchDiscriminator,
    PerceptualLoss,
    kl_divergence,
    reconstruction_loss,
)
from medpretrain.images import save_grid
from medpretrain.schedules import fused

METHOD = "vae"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "vae.yaml"
FIELDS = ["step", "epoch", "loss", "recon", "kl", "beta", "perceptual", "ssim", "adv_g", "adv_d", "val_mse", "val_psnr",
          "val_ssim", "elapsed_s"]
PERCEPTUAL_BN_IMAGES = 1024
"""Real training images the BatchNorm statistics of a random perceptual network are estimated on."""


def build_model(cfg: VAEConfig, in_channels: int, image_size: int, num_classes: int = 0) -> VAE:
    """Backbone encoder, Gaussian head and decoder; a conditional VAE when ``num_classes`` > 0."""
    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    encoder = build_backbone(cfg.backbone.arch, in_channels, stem, image_size=image_size)
    decoder = ConvDecoder(cfg.latent_dim, in_channels, image_size, cfg.decoder_channels, num_classes)
    return VAE(encoder, decoder)


def build_perceptual(cfg: VAEConfig, data: TrainData, device: torch.device) -> PerceptualLoss | None:
    """The frozen feature network of the perceptual term (``None`` when ``perceptual_weight`` is 0).

    ``random``: built with its own seed (``train.seed + 1``, without touching the global RNG), its BatchNorm
    statistics estimated on the first real training images, so every layer's features are standardised on
    this data instead of the initial mean 0 / variance 1. Other specs: :func:`medpretrain.init.init_backbone`.
    """
    if cfg.perceptual_weight <= 0:
        return None
    from medpretrain.init import init_backbone

    arch = cfg.perceptual_arch or cfg.backbone.arch
    stem = resolve_stem(cfg.backbone.stem if not cfg.perceptual_arch else "auto", data.image_size, arch)
    in_channels = data.ds.in_channels
    if cfg.perceptual_init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1)
            features = build_backbone(arch, in_channels, stem, image_size=data.image_size).to(device)
        reestimate_batchnorm(features, dataset_batches(data.ds, PERCEPTUAL_BN_IMAGES, cfg.train.batch_size, device))
    else:
        features, _ = init_backbone(cfg.perceptual_init, arch, in_channels, stem, image_size=data.image_size,
                                    runs_dir="runs", data_mean=cfg.data.mean, data_std=cfg.data.std)
    return PerceptualLoss(features.to(device))


def build_adversarial(cfg: VAEConfig, in_channels: int) -> tuple[PatchDiscriminator, torch.optim.Adam] | None:
    """The VAE-GAN patch discriminator and its Adam (``None`` when ``adversarial_weight`` is 0)."""
    if cfg.adversarial_weight <= 0:
        return None
    disc = PatchDiscriminator(in_channels, cfg.adversarial_channels, cfg.adversarial_layers)
    params = list(disc.parameters())
    opt = torch.optim.Adam(params, lr=cfg.adversarial_lr or cfg.train.lr, betas=(0.5, 0.999), fused=fused(params))
    return disc, opt


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator,
             labels: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruction quality on ``loader`` (z = mu) on the [0, 1] pixel scale: ``val_mse`` (mean over
    pixels and images), ``val_psnr`` (the PSNR of that mean MSE) and ``val_ssim`` (mean per-image SSIM,
    :func:`medpretrain.generative.monitor.ssim`). ``labels``: the class of every image of the loader's
    dataset (a conditional VAE), looked up by the samples' ``index``."""
    model.eval()
    errors, similarities = [], []
    for batch in loader:
        x = batch["image"]
        y = labels[batch["index"].cpu()].to(x.device) if labels is not None else None
        with accelerator.autocast():
            recon = model(x, y=y).recon
        x01, r01 = (x.float() + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1] scale
        errors.append(accelerator.gather_for_metrics((r01 - x01).pow(2).flatten(1).mean(1)))
        similarities.append(accelerator.gather_for_metrics(ssim(r01, x01)))
    model.train()
    mse = float(torch.cat(errors).mean())
    return {"val_mse": mse, "val_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "val_ssim": float(torch.cat(similarities).mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(VAEConfig, argv, defaults_file=DEFAULTS)
    stage = start_generative(METHOD, cfg, FIELDS)
    accelerator, tc = stage.accelerator, cfg.train

    # Data: the whole split cached on the device; validation through a prepared loader.
    data = train_data(stage, cfg)
    val_ds, _ = load_split(cfg.data, "val")
    val_labels = class_labels(val_ds)[0] if data.num_classes else None
    model = build_model(cfg, data.ds.in_channels, data.image_size, data.num_classes)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused(params))
    adversarial = build_adversarial(cfg, data.ds.in_channels)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, data.loader,
                                                               DataLoader(val_ds, batch_size=256))
    disc, opt_d = accelerator.prepare(*adversarial) if adversarial is not None else (None, None)
    perceptual = build_perceptual(cfg, data, accelerator.device)
    beta_at = BetaSchedule(cfg.beta_schedule, cfg.beta, cfg.beta_warmup_steps, cfg.beta_cycle_steps)
    pixels = data.ds.in_channels * data.image_size**2  # the optional terms are weighted per pixel

    steps = Steps(stage, tc, loader, data.sampler_gen)
    if steps.begin():
        accelerator.print(f"resumed from {stage.resume_from} at step {steps.value}")
    terms = [f"{k} {w:g}" for k, w in (("perceptual", cfg.perceptual_weight), ("SSIM", cfg.ssim_weight),
                                       ("adversarial", cfg.adversarial_weight)) if w > 0]
    accelerator.print(f"VAE {cfg.backbone.arch} on {cfg.data.dataset} ({len(data.ds)} images, {data.image_size} px), "
                      f"KL warm-up {cfg.beta_warmup_steps if cfg.beta_schedule == 'linear' else 0} steps"
                      f"{', ' + ', '.join(terms) if terms else ''}, {steps.total} steps -> {stage.run_dir}")
    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)  # same latents in every grid
    fixed_y = grid_labels(tc.grid_size, data.num_classes)  # None unless conditional: the grid cycles the classes
    decoder = accelerator.unwrap_model(model).decoder
    for epoch, batches in steps.epochs():
        model.train()
        for batch in batches:
            x = data.to_images(batch)
            y = data.to_labels(batch)  # None unless conditional
            beta = beta_at(steps.value)
            adv_on = disc is not None and steps.value >= cfg.adversarial_start
            n_prior = len(x) if adv_on and cfg.adversarial_prior else 0
            with accelerator.autocast():
                out = model(x, generator=steps.noise(), n_prior=n_prior, y=y)
                fakes = [out.recon] if out.prior is None else [out.recon, out.prior]
                recon = reconstruction_loss(out.recon, x, cfg.recon_loss)
                kl = kl_divergence(out.mu, out.logvar)
                loss = recon + beta * kl
                perc = perceptual(out.recon, x) if perceptual is not None else None
                if perc is not None:
                    loss = loss + cfg.perceptual_weight * pixels * perc
                sim = 1 - ssim((out.recon + 1) / 2, (x + 1) / 2).mean() if cfg.ssim_weight > 0 else None
                if sim is not None:
                    loss = loss + cfg.ssim_weight * pixels * sim
                adv_g = torch.stack([gan_g_loss(disc(f), "hinge") for f in fakes]).mean() if adv_on else None
                if adv_g is not None:
                    loss = loss + cfg.adversarial_weight * pixels * adv_g
            loss = inject_nan(steps.value + 1, loss)
            optimizer_step(accelerator, loss, optimizer, model.parameters(), cfg.grad_clip)
            adv_d = None
            if adv_on:  # the discriminator's step on real images against the (detached) fakes
                with accelerator.autocast():
                    real_logits = disc(x)
                    adv_d = torch.stack([gan_d_loss(real_logits, disc(f.detach()), "hinge") for f in fakes]).mean()
                opt_d.zero_grad(set_to_none=True)  # drop what the VAE's backward left in D's gradients
                optimizer_step(accelerator, adv_d, opt_d, disc.parameters())
            steps.advance(loss if adv_d is None else loss + adv_d)
            if steps.log_due():
                row = {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "beta": beta,
                       "perceptual": perc.item() if perc is not None else None,
                       "ssim": sim.item() if sim is not None else None,
                       "adv_g": adv_g.item() if adv_g is not None else None,
                       "adv_d": adv_d.item() if adv_d is not None else None}
                steps.log(row)
                steps.bar.set_postfix(loss=f"{row['loss']:.1f}", kl=f"{row['kl']:.1f}")
            if steps.after_step():
                break

        # End of epoch: validation reconstruction and a sample grid from fixed latents.
        val = evaluate(model, val_loader, accelerator, val_labels)
        steps.log(val, check=False)
        accelerator.print(f"epoch {epoch + 1}/{steps.num_epochs} step {steps.value}: val MSE {val['val_mse']:.4f}, "
                          f"PSNR {val['val_psnr']:.2f} dB, SSIM {val['val_ssim']:.3f}")
        if steps.samples_due():
            save_grid(generate(decoder, fixed_z, labels=fixed_y), steps.samples_path())

    # Finish: a last NaN check and checkpoint, then the exports.
    steps.finish()
    val = evaluate(model, val_loader, accelerator, val_labels)
    results: dict[str, Any] = {}
    if stage.is_main:
        vae = accelerator.unwrap_model(model).eval()
        stage.export_backbone(vae.encoder, data.ds, METHOD, data.image_size, steps.value, steps.epoch + 1,
                              {"latent_dim": cfg.latent_dim, **val})
        results = write_outputs(stage, steps, data, "decoder.safetensors", vae.decoder,
                                generator_meta("vae_decoder", vae.decoder, cfg.decoder_channels, data.class_names),
                                generate(vae.decoder, latent_noise(512, cfg.latent_dim, tc.seed + 1),
                                         labels=grid_labels(512, data.num_classes)),
                                ("loss", "recon", "kl", "val_mse"), f"VAE {cfg.backbone.arch}", **val)
        accelerator.print(f"exported {stage.run_dir / 'backbone.safetensors'} and {stage.run_dir / 'decoder.safetensors'}")
    stage.finish()
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
