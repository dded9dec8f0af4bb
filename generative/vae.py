"""VAE pretraining whose encoder is the project's backbone: ``accelerate launch generative/vae.py [key=value ...]``.

Encoder = ``build_backbone(backbone.arch)`` + Gaussian head, decoder = upsample/conv stack
(:mod:`medpretrain.generative`). Loss = summed reconstruction error + beta(step) * KL (+ optional
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
from torch.utils.data import DataLoader
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
    VAE,
    BetaSchedule,
    ConvDecoder,
    PerceptualLoss,
    generate,
    generator_meta,
    kl_divergence,
    latent_noise,
    reconstruction_loss,
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

METHOD = "vae"
DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "vae.yaml"
FIELDS = ["step", "epoch", "loss", "recon", "kl", "beta", "perceptual", "val_mse", "val_psnr", "elapsed_s"]


@dataclasses.dataclass
class VAEConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto`

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    train: GenTrainConfig = dataclasses.field(default_factory=lambda: GenTrainConfig(lr=1e-3))
    latent_dim: int = 64
    decoder_channels: int = 32
    """Channels of the decoder's last block (doubling towards the latent, capped at 512)."""
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = 1.0
    beta_schedule: Literal["constant", "linear", "cyclical"] = "linear"
    beta_warmup_steps: int = 100
    beta_cycle_steps: int = 0
    perceptual_weight: float = 0.0
    """> 0 adds a feature-matching loss through a frozen backbone (``perceptual_init``)."""
    perceptual_init: str = "imagenet"
    """``medpretrain.init.init_backbone`` spec of the frozen extractor: ``imagenet`` or a contract checkpoint."""
    grad_clip: float = 5.0
    """Max gradient norm (0: off)."""
    split: Literal["train", "all"] = "train"
    """Training split; ``train`` keeps the validation split unseen for the reconstruction metrics."""
    out_dir: str = "runs/generative/vae"
    run_name: str = ""


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

    # Data: the whole split cached on the device; validation through a prepared loader.
    train_ds, image_size = load_split(cfg.data, cfg.split)
    val_ds, _ = load_split(cfg.data, "val")
    loader, sampler_gen, to_images = image_loader(train_ds, tc.batch_size, tc.cache_on_device,
                                                  accelerator.device, cfg.data.num_workers)
    val_loader = DataLoader(val_ds, batch_size=256)

    model = build_model(cfg, train_ds.in_channels, image_size)
    perceptual = build_perceptual(cfg, train_ds.in_channels, image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    beta_at = BetaSchedule(cfg.beta_schedule, cfg.beta, cfg.beta_warmup_steps, cfg.beta_cycle_steps)

    steps_per_epoch = len(loader)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    step = Counter()
    ckpt_state = {"step": step}  # saved without pickle (medpretrain.training.save_checkpoint)

    # Resume: the newest complete checkpoint (resume=auto), or start fresh.
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
    accelerator.init_trackers("vae", config={"lr": tc.lr, "beta": cfg.beta, "latent_dim": cfg.latent_dim})
    accelerator.print(f"VAE {cfg.backbone.arch} on {cfg.data.dataset} ({len(train_ds)} images, {image_size} px), "
                      f"{total_steps} steps -> {run_dir}")

    guard = FiniteGuard(accelerator.device)

    def check_guard() -> None:
        try:
            guard.check(last_ckpt, reduce=lambda f: accelerator.gather(f).max())
        except NonFiniteLossError as err:
            accelerator.print(f"ERROR: {err}")
            accelerator.end_training()
            raise

    fixed_z = latent_noise(tc.grid_size, cfg.latent_dim, tc.seed)  # same latents in every grid
    noise_gen = torch.Generator(device=accelerator.device)
    decoder = accelerator.unwrap_model(model).decoder
    start = time.time()
    pbar = tqdm(total=total_steps, initial=step.value, desc="vae", disable=not accelerator.is_local_main_process)
    epoch = step.value // steps_per_epoch
    for epoch in range(step.value // steps_per_epoch, num_epochs):
        if step.value >= total_steps:
            break
        sampler_gen.manual_seed(tc.seed + epoch)  # same order per epoch, so a resume replays it
        skip = step.value - epoch * steps_per_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        model.train()
        for batch in batches:
            x = to_images(batch)
            beta = beta_at(step.value)
            # Noise from a per-process, per-step seed (not the global RNG, which a resume shifts by creating
            # the data iterator after restoring it): a resumed run replays the exact same steps.
            noise_gen.manual_seed((tc.seed << 40) + (accelerator.process_index << 32) + step.value)
            with accelerator.autocast():
                out = model(x, generator=noise_gen)
                recon = reconstruction_loss(out.recon, x, cfg.recon_loss)
                kl = kl_divergence(out.mu, out.logvar)
                loss = recon + beta * kl
                perc = perceptual(out.recon, x) if perceptual is not None else None
                if perc is not None:
                    loss = loss + cfg.perceptual_weight * perc
            loss = inject_nan(step.value + 1, loss)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step.value += 1
            guard.update(loss, step.value)
            pbar.update(1)

            if step.value % tc.log_every == 0 or step.value == total_steps:
                check_guard()
                row = {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "beta": beta}
                if perc is not None:
                    row["perceptual"] = perc.item()
                accelerator.log(row, step=step.value)
                pbar.set_postfix(loss=f"{row['loss']:.1f}", kl=f"{row['kl']:.1f}")
                if accelerator.is_main_process:
                    metrics.log({"step": step.value, "epoch": epoch, **row, "elapsed_s": time.time() - start})
            if tc.checkpoint_every and step.value % tc.checkpoint_every == 0:
                check_guard()
                last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
            fault_hook(step.value)
            if step.value >= total_steps:
                break

        # End of epoch: validation reconstruction and a sample grid from fixed latents.
        val = evaluate(model, val_loader, accelerator)
        accelerator.log(val, step=step.value)
        accelerator.print(f"epoch {epoch + 1}/{num_epochs} step {step.value}: "
                          f"val MSE {val['val_mse']:.4f}, PSNR {val['val_psnr']:.2f} dB")
        if accelerator.is_main_process:
            metrics.log({"step": step.value, "epoch": epoch, **val, "elapsed_s": time.time() - start})
            if (epoch + 1) % max(1, tc.sample_every) == 0 or step.value >= total_steps:
                save_grid(generate(decoder, fixed_z), run_dir / f"samples_epoch{epoch + 1:03d}.png")
    pbar.close()

    # Finish: a last NaN check and checkpoint, then the exports.
    check_guard()
    if last_ckpt is None or checkpoint_step(last_ckpt) != step.value:
        last_ckpt = save_checkpoint(accelerator, step.value, ckpt_state)
    val = evaluate(model, val_loader, accelerator)
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).eval()
        samples = generate(vae.decoder, latent_noise(512, cfg.latent_dim, tc.seed + 1))
        real = torch.stack([val_ds[i]["image"] for i in range(min(512, len(val_ds)))])
        extra = {"latent_dim": cfg.latent_dim, **val}
        export_backbone(run_dir / "backbone.safetensors", vae.encoder, cfg, train_ds, METHOD,
                        image_size, step.value, epoch + 1, extra)
        dec_meta = {**generator_meta("vae_decoder", vae.decoder, cfg.decoder_channels), "method": METHOD,
                    "dataset": train_ds.spec, "dataset_hash": train_ds.fingerprint, "mean": cfg.data.mean,
                    "std": cfg.data.std, "steps": step.value, "config": config_to_dict(cfg)}
        save_state_dict(run_dir / "decoder.safetensors", vae.decoder.state_dict(), dec_meta)
        plot_curves(run_dir / "metrics.csv", run_dir / "loss.png", ("loss", "recon", "kl", "val_mse"),
                    title=f"VAE {cfg.backbone.arch}")
        results = {"method": METHOD, "steps": step.value, "epochs": epoch + 1, "image_size": image_size,
                   "train_wall_s": time.time() - start, **val,
                   "sample_stats": sample_statistics(samples, real), "run_dir": str(run_dir)}
        write_json(run_dir / "results.json", results)
        accelerator.print(f"exported {run_dir / 'backbone.safetensors'} and {run_dir / 'decoder.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
