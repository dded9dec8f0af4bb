"""DCGAN pretraining (Radford et al. 2015): ``accelerate launch generative/dcgan.py [key=value ...]``.

Generator: transposed convolutions with batch norm (:class:`medpretrain.generative.dcgan.DCGANGenerator`).
Discriminator: the project's backbone as trunk plus a linear real/fake head
(:class:`medpretrain.generative.dcgan.BackboneDiscriminator`), so the trained trunk is a contract backbone
that ``finetune/run.py --init dcgan`` compares with the other initialisations. Departure from the paper: its
discriminator is a small strided-conv LeakyReLU net; ours is e.g. a ResNet-18 (ReLU, batch norm).
Adam 2e-4 / beta1 0.5 as in the paper; ``loss=hinge`` and ``spectral_norm=true`` (Miyato et al. 2018)
for stability. Mode collapse (generated-batch diversity far below real-batch diversity for several
checks) stops the run with a clear message (``on_collapse=warn`` only warns).

Exports under ``out_dir/<run_name>/``: ``backbone.safetensors`` (discriminator trunk, ``meta.method =
"dcgan"``), ``generator.safetensors`` (``generative/sample.py --model``), ``config.yaml``, ``metrics.csv``,
``loss.png``, ``samples_epochXXX.png``, ``results.json`` and ``checkpoints/``.

Examples::

    accelerate launch generative/dcgan.py configs/dcgan.yaml
    accelerate launch generative/dcgan.py configs/dcgan.yaml loss=hinge spectral_norm=true run_name=sn
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medpretrain.backbones import build_backbone, resolve_stem
from medpretrain.config import load_config
from medpretrain.faults import inject_nan
from medpretrain.generative.configs import DCGANConfig
from medpretrain.generative.dcgan import BackboneDiscriminator, DCGANGenerator, gan_d_loss, gan_g_loss
from medpretrain.generative.monitor import CollapseMonitor, ModeCollapseError, pairwise_diversity
from medpretrain.generative.sampling import generate, generator_meta, latent_noise
from medpretrain.generative.stage import Steps, start_generative, train_data, write_outputs
from medpretrain.images import save_grid

METHOD = "dcgan"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "dcgan.yaml"
FIELDS = ["step", "epoch", "d_loss", "g_loss", "d_real", "d_fake", "diversity_ratio", "elapsed_s"]


def build_models(cfg: DCGANConfig, in_channels: int, image_size: int) -> tuple[DCGANGenerator, BackboneDiscriminator]:
    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    trunk = build_backbone(cfg.backbone.arch, in_channels, stem, image_size=image_size)
    generator = DCGANGenerator(cfg.latent_dim, in_channels, image_size, cfg.generator_channels)
    return generator, BackboneDiscriminator(trunk, spectral_norm=cfg.spectral_norm)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(DCGANConfig, argv, defaults_file=DEFAULTS)
    stage = start_generative(METHOD, cfg, FIELDS)
    accelerator, tc = stage.accelerator, cfg.train

    data = train_data(stage, cfg)
    generator, discriminator = build_models(cfg, data.ds.in_channels, data.image_size)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr, betas=betas, weight_decay=tc.weight_decay)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr or tc.lr, betas=betas,
                             weight_decay=tc.weight_decay)
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, data.loader
    )

    steps = Steps(stage, tc, loader, data.sampler_gen)
    monitor = CollapseMonitor(cfg.collapse_threshold, cfg.collapse_patience)
    if steps.begin({"collapse_monitor": monitor}):  # the monitor is checkpointed too (without pickle)
        accelerator.print(f"resumed from {stage.resume_from} at step {steps.value}")
    accelerator.print(f"DCGAN (D trunk {cfg.backbone.arch}) on {cfg.data.dataset} ({len(data.ds)} images, "
                      f"{data.image_size} px), {steps.total} steps -> {stage.run_dir}")
    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)
    gen_module = accelerator.unwrap_model(generator)
    warned = False
    for epoch, batches in steps.epochs():
        generator.train()
        discriminator.train()
        for batch in batches:
            real = data.to_images(batch)
            z = torch.randn(real.shape[0], cfg.latent_dim, device=accelerator.device, generator=steps.noise())

            # Discriminator step: real batch and (detached) fake batch, separately as in the paper's code.
            with accelerator.autocast():
                fake = generator(z)
                real_logits = discriminator(real)
                fake_logits = discriminator(fake.detach())
                d_loss = gan_d_loss(real_logits, fake_logits, cfg.loss)
            d_loss = inject_nan(steps.value + 1, d_loss)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()

            # Generator step. D's gradients from this backward are discarded by the next zero_grad.
            with accelerator.autocast():
                g_loss = gan_g_loss(discriminator(fake), cfg.loss)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(g_loss)
            opt_g.step()
            step = steps.advance(d_loss + g_loss)

            if cfg.collapse_check_every and step % cfg.collapse_check_every == 0:
                collapsed = monitor.update(pairwise_diversity(fake), pairwise_diversity(real))
                if collapsed and cfg.on_collapse == "stop":
                    last = stage.last_checkpoint
                    err = ModeCollapseError(step, monitor.last_ratio, cfg.collapse_threshold,
                                            cfg.collapse_patience, str(last) if last else None)
                    accelerator.print(f"ERROR: {err}")
                    if stage.is_main:
                        save_grid(generate(gen_module, fixed_z), stage.run_dir / "samples_collapsed.png")
                    accelerator.end_training()
                    raise err
                if collapsed and not warned:
                    accelerator.print(f"WARNING: possible mode collapse at step {step} "
                                      f"(diversity ratio {monitor.last_ratio:.3f} < {cfg.collapse_threshold})")
                warned = collapsed
            if steps.log_due():
                steps.log({"d_loss": d_loss.item(), "g_loss": g_loss.item(),
                           "d_real": torch.sigmoid(real_logits.float()).mean().item(),
                           "d_fake": torch.sigmoid(fake_logits.float()).mean().item(),
                           "diversity_ratio": monitor.last_ratio})
                steps.bar.set_postfix(d=f"{d_loss.item():.2f}", g=f"{g_loss.item():.2f}")
            if steps.after_step():
                break

        if steps.samples_due():
            save_grid(generate(gen_module, fixed_z), steps.samples_path())
        accelerator.print(f"epoch {epoch + 1}/{steps.num_epochs} step {steps.value} done")

    steps.finish()
    results: dict[str, Any] = {}
    if stage.is_main:
        trunk = accelerator.unwrap_model(discriminator).export_backbone()
        stage.export_backbone(trunk, data.ds, METHOD, data.image_size, steps.value, steps.epoch + 1,
                              {"role": "discriminator trunk", "spectral_norm": cfg.spectral_norm, "loss": cfg.loss})
        results = write_outputs(stage, steps, data, "generator.safetensors", gen_module,
                                generator_meta("dcgan_generator", gen_module, cfg.generator_channels),
                                generate(gen_module, latent_noise(512, cfg.latent_dim, tc.seed + 1)),
                                ("d_loss", "g_loss", "d_real", "diversity_ratio"),
                                f"DCGAN ({cfg.loss}{', SN' if cfg.spectral_norm else ''})")
        accelerator.print(f"exported {stage.run_dir / 'backbone.safetensors'} and "
                          f"{stage.run_dir / 'generator.safetensors'}")
    stage.finish()
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
