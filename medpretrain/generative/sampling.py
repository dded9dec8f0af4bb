"""Drawing images from a decoder / generator, rebuilding one from its checkpoint metadata, per-class sampling
of a conditional one, and the reproducible ``.npz`` writer of ``generative/sample.py``.

Latents come from a CPU generator (:func:`latent_noise`), so a seed gives the same images on every device;
per class (:func:`sample_classes`) from the class's own seed (:func:`~medpretrain.generative.conditioning.class_seed`),
so a class's samples do not depend on which other classes are drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medpretrain.generative.conditioning import class_seed
from medpretrain.generative.dcgan import DCGANGenerator
from medpretrain.generative.ddpm import ddpm_sample
from medpretrain.generative.vae import ConvDecoder

GENERATOR_KINDS = ("vae_decoder", "dcgan_generator", "ddpm_unet")


def latent_noise(n: int, latent_dim: int, seed: int) -> Tensor:
    """``[n, latent_dim]`` standard normal noise from a CPU generator seeded with ``seed``.

    Drawn on the CPU so the same seed gives the same latents on every device.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent_dim, generator=g)


@torch.no_grad()
def generate(model: nn.Module, z: Tensor, batch_size: int = 256, labels: Tensor | None = None) -> Tensor:
    """Images ``[n, C, S, S]`` in [-1, 1] from a decoder / generator in eval mode, on the CPU as float32;
    ``labels [n]``: the class of each image (conditional models only)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if labels is None:
        out = [model(chunk.to(device)).float().cpu() for chunk in torch.split(z, batch_size)]
    else:
        out = [model(chunk.to(device), y.to(device)).float().cpu()
               for chunk, y in zip(torch.split(z, batch_size), torch.split(labels, batch_size), strict=True)]
    model.train(was_training)
    return torch.cat(out).clamp_(-1.0, 1.0)


MIXES = ("even", "data")
"""How ``generative/sample.py`` spreads a conditional model's ``n`` samples over its classes (``mix=``): evenly,
or in the class mix of the model's training images."""


def generator_meta(kind: str, model: ConvDecoder | DCGANGenerator, base_channels: int,
                   class_names: list[str] | None = None) -> dict[str, Any]:
    """What :func:`build_generator` needs to rebuild ``model`` (stored in the safetensors header); a
    conditional model also records ``num_classes``, ``class_dim`` and ``class_names`` (what its labels index;
    ``ValueError`` unless there is one per class)."""
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")
    meta: dict[str, Any] = {
        "kind": kind,
        "latent_dim": model.latent_dim,
        "out_channels": model.out_channels,
        "image_size": model.image_size,
        "base_channels": base_channels,
    }
    names = list(class_names or [])
    if len(names) != model.num_classes:
        raise ValueError(f"the {kind} has {model.num_classes} classes but {len(names)} class names were given")
    if names:
        meta.update(num_classes=model.num_classes, class_dim=model.class_dim, class_names=names)
    return meta


def build_generator(meta: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) decoder, generator or DDPM UNet from its checkpoint metadata
    (:func:`generator_meta` / :func:`ddpm_meta`), class-conditional when the metadata has ``num_classes``
    (then it takes labels: ``generate(model, z, labels=...)``, ``ddpm_sample(..., labels=...)``).

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
        classes = ({"num_classes": int(meta["num_classes"]), "class_dim": int(meta["class_dim"])}
                   if meta.get("num_classes") else {})
    except KeyError as e:
        raise ValueError(f"generator metadata lacks {e.args[0]!r}; was this file written by generative/*.py?") from None
    if kind == "vae_decoder":
        return ConvDecoder(*args, **classes)
    if kind == "dcgan_generator":
        return DCGANGenerator(*args, **classes)
    raise ValueError(f"generator kind must be one of {GENERATOR_KINDS}, got {kind!r}")


def sample_classes(model: nn.Module, meta: dict[str, Any], counts: list[tuple[int, int]], seed: int,
                   batch_size: int = 256, guidance_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Images of a conditional decoder / generator / DDPM UNet (``meta`` from its checkpoint), class by class:
    ``counts`` lists ``(class index, n)``; returns images ``[sum n, C, S, S]`` in [-1, 1] and their labels
    (int64). Class ``c``'s latents (DDPM: its noise) come from ``class_seed(seed, c)``, so its samples are the
    same whichever other classes are drawn and in whatever order. ``guidance_scale``: DDPM only (default:
    the model's). ``ValueError`` for an unconditional model, a class out of range or a negative count."""
    num_classes = int(meta.get("num_classes") or 0)
    if not num_classes:
        raise ValueError(f"this {meta.get('kind')} is unconditional (no num_classes in its metadata): it has no "
                         "classes to sample")
    bad = [f"{c}: {n}" for c, n in counts if not 0 <= c < num_classes or n < 0]
    if bad:
        raise ValueError(f"classes must lie in 0..{num_classes - 1} with counts >= 0, got {', '.join(bad)}")
    images, labels = [], []
    for c, n in counts:
        if n == 0:
            continue
        y = torch.full((n,), c, dtype=torch.int64)
        if meta.get("kind") == "ddpm_unet":
            images.append(ddpm_sample(model, n, class_seed(seed, c), meta, batch_size, labels=y,
                                      guidance_scale=guidance_scale))
        else:
            images.append(generate(model, latent_noise(n, int(meta["latent_dim"]), class_seed(seed, c)), batch_size,
                                   labels=y))
        labels.append(y)
    if not images:
        raise ValueError("no samples requested (every count is 0)")
    return torch.cat(images), torch.cat(labels)


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
