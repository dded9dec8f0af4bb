"""A small DDPM (Ho et al. 2020) from diffusers: the UNet, the moving average of its weights, its checkpoint
metadata and seeded DDIM sampling."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from medpretrain.config import ConfigError


def ddpm_levels(image_size: int, max_levels: int = 4) -> int:
    """Resolution levels of the DDPM UNet: the most (2..``max_levels``) that divide ``image_size`` evenly
    (28 -> 3: 28, 14, 7; 64 -> 4). Raises ``ValueError`` for sizes not divisible by 2."""
    for levels in range(max_levels, 1, -1):
        if image_size % 2 ** (levels - 1) == 0 and image_size // 2 ** (levels - 1) >= 4:
            return levels
    raise ConfigError(f"DDPM UNet needs an even image size of at least 8, got {image_size}")


def build_ddpm_unet(image_size: int, channels: int = 1, base_channels: int = 32) -> nn.Module:
    """A small diffusers ``UNet2DModel`` (Ho et al. 2020 style: ResNet blocks, attention at the lowest
    resolution), one ResNet block per level, channels ``base * (1, 2, 2, 2)[:levels]``."""
    from diffusers import UNet2DModel

    levels = ddpm_levels(image_size)
    widths = tuple(base_channels * m for m in (1, 2, 2, 2)[:levels])
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=widths, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(8, base_channels))
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
              ema_decay: float = 0.0) -> dict[str, Any]:
    """What :func:`build_generator` and :func:`ddpm_sample` need (stored in the safetensors header);
    ``ema_decay``: the weights are a moving average with that (largest) decay, 0: the raw weights."""
    model: Any = unet  # a diffusers UNet2DModel; its ``config`` is a FrozenDict
    config = dict(model.config)
    return {"kind": "ddpm_unet", "unet": {k: v for k, v in config.items() if not k.startswith("_")},
            "image_size": int(config["sample_size"]), "out_channels": int(config["out_channels"]),
            "num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
            "sample_steps": sample_steps, "ema_decay": float(ema_decay)}


@torch.no_grad()
def ddpm_sample(unet: nn.Module, n: int, seed: int, meta: dict[str, Any], batch_size: int = 256,
                steps: int | None = None) -> Tensor:
    """``n`` images in [-1, 1] by deterministic DDIM sampling (eta = 0, Song et al. 2021) with ``steps``
    (default ``meta["sample_steps"]``) from noise drawn on the CPU with ``seed``."""
    from diffusers import DDIMScheduler

    scheduler: Any = DDIMScheduler(num_train_timesteps=int(meta["num_train_timesteps"]),
                              beta_schedule=meta["beta_schedule"], clip_sample=True)
    scheduler.set_timesteps(int(steps or meta["sample_steps"]))
    size, channels = int(meta["image_size"]), int(meta["out_channels"])
    noise = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    out = []
    for x in torch.split(noise, batch_size):
        x = x.to(device)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.float().cpu())
    unet.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)
