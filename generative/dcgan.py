"""DCGAN pretraining (Radford et al. 2015): ``accelerate launch generative/dcgan.py [key=value ...]``.

Generator: transposed convolutions with batch norm and ReLU, ``tanh`` output, sized to the image: a 7x7
start map at 28 px, 4x4 at 32 / 64 / 128 px (:class:`medpretrain.generative.dcgan.DCGANGenerator`).
Discriminator (``discriminator=``):

* ``radford`` (default): the paper's strided-conv discriminator with LeakyReLU(0.2) and BatchNorm, its
  mirror (:class:`~medpretrain.generative.dcgan.RadfordDiscriminator`); the trunk is the registered backbone
  ``dcgan_d<n>`` (28 px: ``dcgan_d2``, 32: ``d3``, 64: ``d4``, 128: ``d5``), ``backbone.*`` is unused;
* ``backbone``: ``backbone.arch`` (e.g. ResNet-18) as the trunk with a linear head
  (:class:`~medpretrain.generative.dcgan.BackboneDiscriminator`), so the export is that network.

Adam 2e-4 / beta1 0.5 as in the paper; ``train.lr`` is the generator's learning rate and ``d_lr`` the
discriminator's (two timescales, Heusel et al. 2017); ``loss=hinge`` and ``spectral_norm=true`` (Miyato et
al. 2018) for stability. Mode collapse (generated-batch diversity far below real-batch diversity for several
checks; conditional runs: within the worst class of the batch, since one image per class keeps a batch varied)
stops the run with a clear message (``on_collapse=warn`` only warns).

``conditional=true`` (a labelled source) learns p(x | class): G gets a class embedding concatenated to z, D
(either kind) the projection term of Miyato & Koyama 2018 (logit + <embed(y), pooled trunk features>); real
and generated batches of a step carry the same labels (the real batch's), grids cycle through the classes,
and ``generator.safetensors`` records ``num_classes`` and ``class_names`` for ``sample.py per_class=<n>``.

What ``--init dcgan`` gets: ``backbone.safetensors`` is the discriminator's trunk (without its real/fake
head), ``meta.method = "dcgan"``, ``meta.arch`` the trunk's registered arch; its BatchNorm running statistics
are re-estimated on real training images only (``export_bn_images``; during training they mixed real and
generated batches). Fine-tuning builds that arch: ``finetune/run.py --init dcgan backbone.arch=dcgan_d2``
(or ``init=<path>``) for the default at 28 px; ``discriminator=backbone`` keeps ``backbone.arch``.

Exports under ``out_dir/<run_name>/``: ``backbone.safetensors``, ``generator.safetensors``
(``generative/sample.py --model``), ``config.yaml``, ``metrics.csv``, ``loss.png``, ``samples_epochXXX.png``,
``results.json`` and ``checkpoints/``.

Examples::

    accelerate launch generative/dcgan.py configs/dcgan.yaml
    accelerate launch generative/dcgan.py configs/dcgan.yaml loss=hinge spectral_norm=true d_lr=4e-4 run_name=sn
    accelerate launch generative/dcgan.py configs/dcgan.yaml discriminator=backbone backbone.arch=resnet18
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medpretrain.backbones import build_backbone, resolve_stem
from medpretrain.config import load_config
from medpretrain.faults import inject_nan
from medpretrain.generative.conditioning import grid_labels
from medpretrain.generative.configs import DCGANConfig
from medpretrain.generative.dcgan import (
    BackboneDiscriminator,
    DCGANGenerator,
    RadfordDiscriminator,
    dataset_batches,
    gan_d_loss,
    gan_g_loss,
    radford_arch,
    reestimate_batchnorm,
)
from medpretrain.generative.monitor import CollapseMonitor, ModeCollapseError, diversity_ratio
from medpretrain.generative.sampling import generate, generator_meta, latent_noise
from medpretrain.generative.stage import Steps, TrainData, start_generative, train_data, write_outputs
from medpretrain.images import save_grid
from medpretrain.schedules import fused

METHOD = "dcgan"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "dcgan.yaml"
FIELDS = ["step", "epoch", "d_loss", "g_loss", "d_real", "d_fake", "diversity_ratio", "elapsed_s"]


def build_models(cfg: DCGANConfig, in_channels: int, image_size: int,
                 num_classes: int = 0) -> tuple[DCGANGenerator, BackboneDiscriminator]:
    """G and D, class-conditional when ``num_classes`` > 0 (G: class embedding on z; D: projection)."""
    # D's trunk first, then G: the order the seeded initialisation draws them in.
    if cfg.discriminator == "radford":
        trunk = build_backbone(radford_arch(image_size), in_channels, "auto", image_size=image_size)
    else:
        stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
        trunk = build_backbone(cfg.backbone.arch, in_channels, stem, image_size=image_size)
    generator = DCGANGenerator(cfg.latent_dim, in_channels, image_size, cfg.generator_channels, num_classes)
    if cfg.discriminator == "radford":
        return generator, RadfordDiscriminator(trunk, image_size, spectral_norm=cfg.spectral_norm,
                                               num_classes=num_classes)
    return generator, BackboneDiscriminator(trunk, spectral_norm=cfg.spectral_norm, num_classes=num_classes)


def build_optimizers(cfg: DCGANConfig, generator: torch.nn.Module,
                     discriminator: torch.nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G at ``train.lr`` and for D at ``d_lr`` (0: ``train.lr``), both with ``adam_beta1/2``."""
    betas, wd = (cfg.adam_beta1, cfg.adam_beta2), cfg.train.weight_decay
    g, d = list(generator.parameters()), list(discriminator.parameters())
    opt_g = torch.optim.Adam(g, lr=cfg.train.lr, betas=betas, weight_decay=wd, fused=fused(g))
    opt_d = torch.optim.Adam(d, lr=cfg.d_lr or cfg.train.lr, betas=betas, weight_decay=wd, fused=fused(d))
    return opt_g, opt_d


def export_trunk(discriminator: BackboneDiscriminator, data: TrainData, n_images: int, batch_size: int,
                 device: torch.device) -> tuple[torch.nn.Module, int]:
    """The discriminator's trunk (plain weights, CPU, eval) with its BatchNorm statistics re-estimated on the
    first ``n_images`` (0: all) training images in order, in batches of ``batch_size``; no generated image
    enters them. Returns the trunk and the number of images used."""
    trunk = discriminator.export_backbone().to(device)
    used = reestimate_batchnorm(trunk, dataset_batches(data.ds, n_images, batch_size, device))
    return trunk.cpu().eval(), used


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(DCGANConfig, argv, defaults_file=DEFAULTS)
    stage = start_generative(METHOD, cfg, FIELDS)
    accelerator, tc = stage.accelerator, cfg.train

    data = train_data(stage, cfg)
    generator, discriminator = build_models(cfg, data.ds.in_channels, data.image_size, data.num_classes)
    opt_g, opt_d = build_optimizers(cfg, generator, discriminator)
    d_arch = discriminator.backbone.arch
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, data.loader
    )

    steps = Steps(stage, tc, loader, data.sampler_gen)
    monitor = CollapseMonitor(cfg.collapse_threshold, cfg.collapse_patience)
    if steps.begin({"collapse_monitor": monitor}):  # the monitor is checkpointed too (without pickle)
        accelerator.print(f"resumed from {stage.resume_from} at step {steps.value}")
    classes = f", conditional on {data.num_classes} classes" if data.num_classes else ""
    accelerator.print(f"DCGAN ({cfg.discriminator} discriminator, trunk {d_arch}{classes}) on {cfg.data.dataset} "
                      f"({len(data.ds)} images, {data.image_size} px), {steps.total} steps -> {stage.run_dir}")
    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)
    fixed_y = grid_labels(tc.grid_size, data.num_classes)  # None unless conditional: the grid cycles the classes
    gen_module = accelerator.unwrap_model(generator)
    warned = False
    for epoch, batches in steps.epochs():
        generator.train()
        discriminator.train()
        for batch in batches:
            real = data.to_images(batch)
            y = data.to_labels(batch)  # None unless conditional; the fakes are drawn for the real batch's classes
            z = torch.randn(real.shape[0], cfg.latent_dim, device=accelerator.device, generator=steps.noise())

            # Discriminator step: real batch and (detached) fake batch, separately as in the paper's code.
            with accelerator.autocast():
                fake = generator(z, y)
                real_logits = discriminator(real, y)
                fake_logits = discriminator(fake.detach(), y)
                d_loss = gan_d_loss(real_logits, fake_logits, cfg.loss)
            d_loss = inject_nan(steps.value + 1, d_loss)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()

            # Generator step. D's gradients from this backward are discarded by the next zero_grad.
            with accelerator.autocast():
                g_loss = gan_g_loss(discriminator(fake, y), cfg.loss)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(g_loss)
            opt_g.step()
            step = steps.advance(d_loss + g_loss)

            if cfg.collapse_check_every and step % cfg.collapse_check_every == 0:
                collapsed = monitor.update(diversity_ratio(fake, real, y))  # conditional: the worst class
                if collapsed and cfg.on_collapse == "stop":
                    last = stage.last_checkpoint
                    err = ModeCollapseError(step, monitor.last_ratio, cfg.collapse_threshold,
                                            cfg.collapse_patience, str(last) if last else None)
                    accelerator.print(f"ERROR: {err}")
                    if stage.is_main:
                        save_grid(generate(gen_module, fixed_z, labels=fixed_y), stage.run_dir / "samples_collapsed.png")
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
            save_grid(generate(gen_module, fixed_z, labels=fixed_y), steps.samples_path())
        accelerator.print(f"epoch {epoch + 1}/{steps.num_epochs} step {steps.value} done")

    steps.finish()
    results: dict[str, Any] = {}
    if stage.is_main:
        trunk, n_bn = export_trunk(accelerator.unwrap_model(discriminator), data, cfg.export_bn_images,
                                   tc.batch_size, accelerator.device)
        stage.export_backbone(trunk, data.ds, METHOD, data.image_size, steps.value, steps.epoch + 1,
                              {"role": "discriminator trunk", "discriminator": cfg.discriminator,
                               "spectral_norm": cfg.spectral_norm, "loss": cfg.loss, "bn_images": n_bn,
                               "bn_statistics": f"re-estimated on {n_bn} real training images (no generated images)"})
        results = write_outputs(stage, steps, data, "generator.safetensors", gen_module,
                                generator_meta("dcgan_generator", gen_module, cfg.generator_channels, data.class_names),
                                generate(gen_module, latent_noise(512, cfg.latent_dim, tc.seed + 1),
                                         labels=grid_labels(512, data.num_classes)),
                                ("d_loss", "g_loss", "d_real", "diversity_ratio"),
                                f"DCGAN ({cfg.discriminator} D, {cfg.loss}{', SN' if cfg.spectral_norm else ''})",
                                discriminator_arch=d_arch, bn_images=n_bn)
        accelerator.print(f"exported {stage.run_dir / 'backbone.safetensors'} (discriminator trunk {d_arch}, "
                          f"BatchNorm statistics of {n_bn} real images; fine-tune with backbone.arch={d_arch}) and "
                          f"{stage.run_dir / 'generator.safetensors'}")
    stage.finish()
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
