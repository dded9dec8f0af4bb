"""Drawing images from a decoder / generator, rebuilding one from its checkpoint metadata, and the
reproducible ``.npz`` writer of ``generative/sample.py``.

Latents come from a CPU generator (:func:`latent_noise`), so a seed gives the same images on every device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medpretrain.generative.dcgan import DCGANGenerator
from medpretrain.generative.vae import ConvDecoder

GENERATOR_KINDS = ("vae_decoder", "dcgan_generator", "ddpm_unet")


def latent_noise(n: int, latent_dim: int, seed: int) -> Tensor:
    """``[n, latent_dim]`` standard normal noise from a CPU generator seeded with ``seed``.

    Drawn on the CPU so the same seed gives the same latents on every device.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent_dim, generator=g)


@torch.no_grad()
def generate(model: nn.Module, z: Tensor, batch_size: int = 256) -> Tensor:
    """Images ``[n, C, S, S]`` in [-1, 1] from a decoder / generator in eval mode, on the CPU as float32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(chunk.to(device)).float().cpu() for chunk in torch.split(z, batch_size)]
    model.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)


def generator_meta(kind: str, model: ConvDecoder | DCGANGenerator, base_channels: int) -> dict[str, Any]:
    """What :func:`build_generator` needs to rebuild ``model`` (stored in the safetensors header)."""
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")
    return {
        "kind": kind,
        "latent_dim": model.latent_dim,
        "out_channels": model.out_channels,
        "image_size": model.image_size,
        "base_channels": base_channels,
    }


def build_generator(meta: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) decoder, generator or DDPM UNet from its checkpoint metadata
    (:func:`generator_meta` / :func:`ddpm_meta`).

    Raises ``ValueError`` when ``kind`` is unknown or a field is missing.
    """
    if meta.get("kind") == "ddpm_unet":
        from diffusers import UNet2DModel

        if "unet" not in meta:
            raise ValueError("ddpm_unet metadata lacks 'unet' (the UNet2DModel config)")
        return UNet2DModel.from_config(meta["unet"])
    try:
        kind = meta["kind"]
        args = (int(meta["latent_dim"]), int(meta["out_channels"]), int(meta["image_size"]),
                int(meta["base_channels"]))
    except KeyError as e:
        raise ValueError(f"generator metadata lacks {e.args[0]!r}; was this file written by generative/*.py?") from None
    if kind == "vae_decoder":
        return ConvDecoder(*args)
    if kind == "dcgan_generator":
        return DCGANGenerator(*args)
    raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")


def save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez_compressed`` with fixed zip timestamps, so equal arrays give byte-identical files.

    (``np.savez`` stamps every member with the current time.) Written atomically.
    """
    import io
    import zipfile

    from medpretrain.utils import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            array = np.asarray(arrays[name])  # not ascontiguousarray: it turns 0-d arrays into 1-d
            np.lib.format.write_array(buf, array if array.flags.c_contiguous else array.copy(order="C"),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    return Path(path)
