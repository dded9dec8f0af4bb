"""DCGAN pretraining (Radford et al. 2015): ``accelerate launch generative/dcgan.py [key=value ...]``.

Generator: transposed convolutions with batch norm (:class:`medpretrain.generative.DCGANGenerator`).
Discriminator: the project's backbone as trunk plus a linear real/fake head
(:class:`medpretrain.generative.BackboneDiscriminator`), so the trained trunk is a contract backbone that
``finetune/run.py --init dcgan`` compares with the other initialisations. Departure from the paper: its
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

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from common import (
    GenTrainConfig,
    check_data_config,
    export_backbone,
    fault_hook,
    image_loader,
    inject_nan,
    load_split,
    resolve_run_dir,
    write_json,
)
from tqdm.auto import tqdm

from medpretrain.backbones import build_backbone, resolve_stem
from medpretrain.checkpoint import save_state_dict
from medpretrain.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    config_to_dict,
    load_config,
    save_config,
)
from medpretrain.distributed import check_world, cpu_group_needed
from medpretrain.generative import (
    BackboneDiscriminator,
    CollapseMonitor,
    DCGANGenerator,
    ModeCollapseError,
    gan_d_loss,
    gan_g_loss,
    generate,
    generator_meta,
    latent_noise,
    pairwise_diversity,
    sample_statistics,
    save_grid,
)
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

METHOD = "dcgan"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "dcgan.yaml"
FIELDS = ["step", "epoch", "d_loss", "g_loss", "d_real", "d_fake", "diversity_ratio", "elapsed_s"]


@dataclasses.dataclass
class DCGANConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Discriminator trunk (exported as the ``dcgan`` backbone)."""
    train: GenTrainConfig = dataclasses.field(default_factory=lambda: GenTrainConfig(lr=2e-4))
    latent_dim: int = 100
    generator_channels: int = 64
    """Channels of the generator's last hidden layer (doubling towards the latent, capped at 512)."""
    d_lr: float = 0.0
    """Discriminator learning rate (0: same as ``train.lr``)."""
    adam_beta1: float = 0.5
    adam_beta2: float = 0.999
    loss: Literal["bce", "hinge"] = "bce"
    spectral_norm: bool = False
    collapse_check_every: int = 10
    """Optimizer steps between diversity checks (0: never)."""
    collapse_threshold: float = 0.2
    """Collapse when generated diversity < this fraction of real diversity ..."""
    collapse_patience: int = 5
    """... for this many consecutive checks."""
    on_collapse: Literal["stop", "warn"] = "stop"
    split: Literal["train", "all"] = "train"
    out_dir: str = "runs/generative/dcgan"
    run_name: str = ""


def build_models(cfg: DCGANConfig, in_channels: int, image_size: int) -> tuple[DCGANGenerator, BackboneDiscriminator]:
    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    trunk = build_backbone(cfg.backbone.arch, in_channels, stem, image_size=image_size)
    generator = DCGANGenerator(cfg.latent_dim, in_channels, image_size, cfg.generator_channels)
    return generator, BackboneDiscriminator(trunk, spectral_norm=cfg.spectral_norm)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(DCGANConfig, argv, defaults_file=DEFAULTS)
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
    generator, discriminator = build_models(cfg, train_ds.in_channels, image_size)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr, betas=betas, weight_decay=tc.weight_decay)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr or tc.lr, betas=betas,
                             weight_decay=tc.weight_decay)
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, loader
    )

    steps_per_epoch = len(loader)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    step = Counter()
    monitor = CollapseMonitor(cfg.collapse_threshold, cfg.collapse_patience)
    ckpt_state = {"step": step, "collapse_monitor": monitor}  # saved without pickle (save_checkpoint)

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
    accelerator.init_trackers("dcgan", config={"lr": tc.lr, "loss": cfg.loss, "spectral_norm": cfg.spectral_norm})
    accelerator.print(f"DCGAN (D trunk {cfg.backbone.arch}) on {cfg.data.dataset} ({len(train_ds)} images, "
                      f"{image_size} px), {total_steps} steps -> {run_dir}")

    guard = FiniteGuard(accelerator.device)

    def check_guard() -> None:
        try:
            guard.check(last_ckpt, reduce=lambda f: accelerator.gather(f).max())
        except NonFiniteLossError as err:
            accelerator.print(f"ERROR: {err}")
            accelerator.end_training()
            raise

    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)
    noise_gen = torch.Generator(device=accelerator.device)
    gen_module = accelerator.unwrap_model(generator)
    warned = False
    start = time.time()
    pbar = tqdm(total=total_steps, initial=step.value, desc="dcgan", disable=not accelerator.is_local_main_process)
    epoch = step.value // steps_per_epoch
    for epoch in range(step.value // steps_per_epoch, num_epochs):
        if step.value >= total_steps:
            break
        sampler_gen.manual_seed(tc.seed + epoch)
        skip = step.value - epoch * steps_per_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        generator.train()
        discriminator.train()
        for batch in batches:
            real = to_images(batch)
            # Per-process, per-step seed (see vae.py): resumes replay the same latents.
            noise_gen.manual_seed((tc.seed << 40) + (accelerator.process_index << 32) + step.value)
            z = torch.randn(real.shape[0], cfg.latent_dim, device=accelerator.device, generator=noise_gen)

            # Discriminator step: real batch and (detached) fake batch, separately as in the paper's code.
            with accelerator.autocast():
                fake = generator(z)
                real_logits = discriminator(real)
                fake_logits = discriminator(fake.detach())
                d_loss = gan_d_loss(real_logits, fake_logits, cfg.loss)
            d_loss = inject_nan(step.value + 1, d_loss)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()

            # Generator step. D's gradients from this backward are discarded by the next zero_grad.
            with accelerator.autocast():
                g_loss = gan_g_loss(discriminator(fake), cfg.loss)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(g_loss)
            opt_g.step()
            step.value += 1
            guard.update(d_loss + g_loss, step.value)
            pbar.update(1)

            if cfg.collapse_check_every and step.value % cfg.collapse_check_every == 0:
                collapsed = monitor.update(pairwise_diversity(fake), pairwise_diversity(real))
                if collapsed and cfg.on_collapse == "stop":
                    err = ModeCollapseError(step.value, monitor.last_ratio, cfg.collapse_threshold,
                                            cfg.collapse_patience, str(last_ckpt) if last_ckpt else None)
                    accelerator.print(f"ERROR: {err}")
                    if accelerator.is_main_process:
                        save_grid(generate(gen_module, fixed_z), run_dir / "samples_collapsed.png")
                    accelerator.end_training()
                    raise err
                if collapsed and not warned:
                    accelerator.print(f"WARNING: possible mode collapse at step {step.value} "
                                      f"(diversity ratio {monitor.last_ratio:.3f} < {cfg.collapse_threshold})")
                warned = collapsed
            if step.value % tc.log_every == 0 or step.value == total_steps:
                check_guard()
                row = {"d_loss": d_loss.item(), "g_loss": g_loss.item(),
                       "d_real": torch.sigmoid(real_logits.float()).mean().item(),
                       "d_fake": torch.sigmoid(fake_logits.float()).mean().item(),
                       "diversity_ratio": monitor.last_ratio}
                accelerator.log(row, step=step.value)
                pbar.set_postfix(d=f"{row['d_loss']:.2f}", g=f"{row['g_loss']:.2f}")
                if accelerator.is_main_process:
                    metrics.log({"step": step.value, "epoch": epoch, **row, "elapsed_s": time.time() - start})
            if tc.checkpoint_every and step.value % tc.checkpoint_every == 0:
                check_guard()
                last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
            fault_hook(step.value)
            if step.value >= total_steps:
                break

        if accelerator.is_main_process and ((epoch + 1) % max(1, tc.sample_every) == 0 or step.value >= total_steps):
            save_grid(generate(gen_module, fixed_z), run_dir / f"samples_epoch{epoch + 1:03d}.png")
        accelerator.print(f"epoch {epoch + 1}/{num_epochs} step {step.value} done")
    pbar.close()

    check_guard()
    if last_ckpt is None or checkpoint_step(last_ckpt) != step.value:
        last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        disc = accelerator.unwrap_model(discriminator)
        samples = generate(gen_module, latent_noise(512, cfg.latent_dim, tc.seed + 1))
        val_ds, _ = load_split(cfg.data, "val")
        real = torch.stack([val_ds[i]["image"] for i in range(min(512, len(val_ds)))])
        stats = sample_statistics(samples, real)
        export_backbone(run_dir / "backbone.safetensors", disc.export_backbone(), cfg, train_ds, METHOD,
                        image_size, step.value, epoch + 1,
                        {"role": "discriminator trunk", "spectral_norm": cfg.spectral_norm, "loss": cfg.loss})
        gen_meta = {**generator_meta("dcgan_generator", gen_module, cfg.generator_channels), "method": METHOD,
                    "dataset": train_ds.spec, "dataset_hash": train_ds.fingerprint, "mean": cfg.data.mean,
                    "std": cfg.data.std, "steps": step.value, "config": config_to_dict(cfg)}
        save_state_dict(run_dir / "generator.safetensors", gen_module.state_dict(), gen_meta)
        plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", ("d_loss", "g_loss", "d_real", "diversity_ratio"),
                    title=f"DCGAN ({cfg.loss}{', SN' if cfg.spectral_norm else ''})")
        results = {"method": METHOD, "steps": step.value, "epochs": epoch + 1, "image_size": image_size,
                   "train_wall_s": time.time() - start, "sample_stats": stats, "run_dir": str(run_dir)}
        write_json(run_dir / "results.json", results)
        accelerator.print(f"exported {run_dir / 'backbone.safetensors'} and {run_dir / 'generator.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
