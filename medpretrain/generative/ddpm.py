"""A small DDPM (Ho et al. 2020) from diffusers: the UNet, the moving average of its weights, its checkpoint
metadata and seeded DDIM sampling, unconditional or class-conditional (``UNet2DModel(num_class_embeds=K)``,
optionally with a null class for classifier-free guidance, Ho & Salimans 2022)."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from medpretrain.config import ConfigError
from medpretrain.generative.conditioning import check_labels


def ddpm_levels(image_size: int, max_levels: int = 4) -> int:
    """Resolution levels of the DDPM UNet: the most (2..``max_levels``) that divide ``image_size`` evenly
    (28 -> 3: 28, 14, 7; 64 -> 4). Raises ``ValueError`` for sizes not divisible by 2."""
    for levels in range(max_levels, 1, -1):
        if image_size % 2 ** (levels - 1) == 0 and image_size // 2 ** (levels - 1) >= 4:
            return levels
    raise ConfigError(f"DDPM UNet needs an even image size of at least 8, got {image_size}")


def build_ddpm_unet(image_size: int, channels: int = 1, base_channels: int = 32, num_classes: int = 0,
                    null_class: bool = False) -> nn.Module:
    """A small diffusers ``UNet2DModel`` (Ho et al. 2020 style: ResNet blocks, attention at the lowest
    resolution), one ResNet block per level, channels ``base * (1, 2, 2, 2)[:levels]``.

    ``num_classes`` K > 0: class-conditional the way diffusers intends, ``num_class_embeds=K`` (a learned
    class embedding added to the timestep embedding; the forward takes ``class_labels``); ``null_class``: one
    more embedding, index K, the "no class" of classifier-free guidance."""
    from diffusers import UNet2DModel

    if num_classes < 0 or num_classes == 1 or (null_class and not num_classes):
        raise ValueError(f"num_classes must be 0 or at least 2 (null_class only with classes), got {num_classes}, "
                         f"null_class={null_class}")
    conditional = {"num_class_embeds": num_classes + int(null_class)} if num_classes else {}

    levels = ddpm_levels(image_size)
    widths = tuple(base_channels * m for m in (1, 2, 2, 2)[:levels])
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=widths, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(8, base_channels), **conditional)
    return cast(nn.Module, unet)


def build_ema(unet: nn.Module, decay: float, power: float = 0.75) -> Any:
    """diffusers' ``EMAModel`` over ``unet``'s parameters (a copy of them on their device), or ``None`` when
    ``decay`` is 0.

    Warm-up as in diffusers' training scripts (``use_ema_warmup=True``, inv_gamma 1, Karras et al.'s / crowsonkb's
    schedule): after ``t`` calls of ``ema.step(params)`` the decay is ``min(decay, 1 - t ** -power)``, so the first
    step copies the weights and a short run is not pulled back to its initialisation. Its ``state_dict()``
    (tensors, numbers) goes into the resume checkpoint as it is. Raises ``ValueError`` for ``decay`` outside
    [0, 1) or ``power`` <= 0.
    """
    if not 0.0 <= decay < 1.0 or power <= 0:
        raise ValueError(f"EMA decay must be in [0, 1) and power > 0, got decay={decay}, power={power}")
    if decay == 0.0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=float(decay), min_decay=0.0, use_ema_warmup=True, inv_gamma=1.0,
                    power=float(power))


def averaged(unet: nn.Module, ema: Any) -> nn.Module:
    """``unet`` itself when ``ema`` is ``None``, else a copy of it holding the moving average (what the grids
    and the export use; the UNet has no buffers, so its parameters are its whole state)."""
    if ema is None:
        return unet
    model = copy.deepcopy(unet)
    ema.copy_to(model.parameters())
    return model


def ddpm_meta(unet: nn.Module, num_train_timesteps: int, beta_schedule: str, sample_steps: int,
              ema_decay: float = 0.0, class_names: list[str] | None = None,
              guidance_scale: float = 1.0) -> dict[str, Any]:
    """What :func:`build_generator` and :func:`ddpm_sample` need (stored in the safetensors header);
    ``ema_decay``: the weights are a moving average with that (largest) decay, 0: the raw weights.

    A conditional UNet also records ``num_classes``, ``class_names`` (what its labels index), ``null_class``
    (the index of the guidance's "no class", or ``None``) and ``guidance_scale`` (the default of sampling).
    ``ValueError`` when ``class_names`` does not match the UNet's class embeddings."""
    model: Any = unet  # a diffusers UNet2DModel; its ``config`` is a FrozenDict
    config = dict(model.config)
    meta: dict[str, Any] = {"kind": "ddpm_unet", "unet": {k: v for k, v in config.items() if not k.startswith("_")},
                            "image_size": int(config["sample_size"]), "out_channels": int(config["out_channels"]),
                            "num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
                            "sample_steps": sample_steps, "ema_decay": float(ema_decay)}
    embeds, names = config.get("num_class_embeds") or 0, list(class_names or [])
    if embeds not in ((len(names), len(names) + 1) if names else (0,)):
        raise ValueError(f"the UNet has {embeds} class embeddings but {len(names)} class names were given")
    if names:
        meta.update(num_classes=len(names), class_names=names, null_class=len(names) if embeds > len(names) else None,
                    guidance_scale=float(guidance_scale))
    return meta


@torch.no_grad()
def ddpm_sample(unet: nn.Module, n: int, seed: int, meta: dict[str, Any], batch_size: int = 256,
                steps: int | None = None, labels: Tensor | None = None,
                guidance_scale: float | None = None) -> Tensor:
    """``n`` images in [-1, 1] by deterministic DDIM sampling (eta = 0, Song et al. 2021) with ``steps``
    (default ``meta["sample_steps"]``) from noise drawn on the CPU with ``seed``.

    A conditional UNet (``meta["num_classes"]``) needs ``labels [n]`` (class indices); with a guidance
    weight w (``guidance_scale``, default ``meta["guidance_scale"]``) other than 1 each step is classifier-free
    guided, ``eps(x, null) + w * (eps(x, y) - eps(x, null))`` (the UNet must have a null class). Raises
    ``ValueError`` for missing or superfluous labels and for guidance without a null class."""
    from diffusers import DDIMScheduler

    num_classes = int(meta.get("num_classes") or 0)
    if num_classes:
        labels = check_labels(labels, n, num_classes, "DDPM UNet").to(torch.int64)
    elif labels is not None:
        raise ValueError("this DDPM UNet is unconditional (no num_classes in its metadata) but was given class labels")
    w = float(meta.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    null = meta.get("null_class")
    if w != 1.0 and (not num_classes or null is None):
        raise ValueError(f"guidance_scale={w} needs a conditional UNet trained with a null class (class_dropout > 0)")
    null_label = int(null) if null is not None else -1  # used only when guiding

    scheduler: Any = DDIMScheduler(num_train_timesteps=int(meta["num_train_timesteps"]),
                              beta_schedule=meta["beta_schedule"], clip_sample=True)
    scheduler.set_timesteps(int(steps or meta["sample_steps"]))
    size, channels = int(meta["image_size"]), int(meta["out_channels"])
    noise = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    out = []
    batches = torch.split(noise, batch_size)
    chunks: list[Tensor | None] = list(torch.split(labels, batch_size)) if labels is not None else [None] * len(batches)
    for x, y in zip(batches, chunks, strict=True):
        x = x.to(device)
        y = y.to(device) if y is not None else None
        for t in scheduler.timesteps:
            if y is None:
                eps = unet(x, t).sample
            elif w == 1.0:
                eps = unet(x, t, class_labels=y).sample
            else:  # the conditional and the null-class prediction in one batch
                eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, torch.full_like(y, null_label)])
                                    ).sample.chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.float().cpu())
    unet.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)
