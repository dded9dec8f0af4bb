"""Draw synthetic scans from a trained VAE decoder or DCGAN generator, reproducibly.

    python generative/sample.py --model runs/generative/dcgan/<run>/generator.safetensors --n 1000 --out samples/
    python generative/sample.py --model runs/generative/vae/<run> --n 1000 --out samples/ --seed 1

``--model`` is a ``decoder.safetensors`` / ``generator.safetensors`` / ``unet.safetensors`` written by
``generative/vae.py`` / ``dcgan.py`` / ``ddpm.py`` (or their run folder; DDPM samples by 50-step DDIM). Latents come from a CPU generator seeded with ``--seed``,
so the same model and seed give the same images (and a byte-identical ``samples.npz``).

Writes into ``--out``: ``png/sample_00000.png`` ... (8-bit grey, or RGB for 3-channel models),
``samples.npz`` (``images``: uint8 in MedMNIST layout ``[N, H, W]`` or ``[N, H, W, 3]``, ``seed``),
``grid.png`` (the first ``grid`` samples) and ``samples.json`` (model file, its sha256, seed, metadata).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medpretrain.checkpoint import load_exact, load_state_dict
from medpretrain.config import ConfigError, load_config
from medpretrain.generative.ddpm import ddpm_sample
from medpretrain.generative.sampling import build_generator, generate, latent_noise, save_npz
from medpretrain.images import save_grid, to_uint8
from medpretrain.utils import atomic_write_text, sha256_file

MODEL_FILES = ("generator.safetensors", "decoder.safetensors", "unet.safetensors")


@dataclasses.dataclass
class SampleConfig:
    model: str = ""
    """A decoder / generator ``.safetensors`` file, or a run folder holding one."""
    n: int = 1000
    out: str = ""
    seed: int = 0
    batch_size: int = 250
    grid: int = 64
    """Images in ``grid.png`` (the first ones)."""
    png: bool = True
    """Write one PNG per sample (besides the ``.npz``)."""
    device: str = "cpu"


def resolve_model_file(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(MODEL_FILES)} in this run folder")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    return path


def load_generator(path: Path, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the decoder / generator from the file's metadata and load its weights exactly."""
    state, meta = load_state_dict(path)
    model = build_generator(meta)
    load_exact(model, state, path)
    return model.to(device).eval(), meta


def write_samples(images: torch.Tensor, out: Path, cfg: SampleConfig, model_file: Path, meta: dict[str, Any]) -> None:
    pixels = to_uint8(images)  # [N, C, H, W]
    array = pixels[:, 0].numpy() if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1).numpy()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.png:
        png_dir = out / "png"
        png_dir.mkdir(exist_ok=True)
        for old in png_dir.glob("sample_*.png"):  # a previous, larger --n must not leave extra files
            old.unlink()
        for i, img in enumerate(array):
            Image.fromarray(img).save(png_dir / f"sample_{i:05d}.png")
    save_npz(out / "samples.npz", {"images": array, "seed": np.asarray(cfg.seed, dtype=np.int64)})
    save_grid(images[: cfg.grid], out / "grid.png")
    info = {"model": str(model_file), "model_sha256": sha256_file(model_file), "n": cfg.n, "seed": cfg.seed,
            "shape": list(array.shape), "dtype": "uint8", "range": [0, 255],
            "generator": {k: v for k, v in meta.items() if k != "config"}}
    atomic_write_text(out / "samples.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(SampleConfig, argv)
    if not cfg.model or not cfg.out:
        raise ConfigError("--model and --out are required (e.g. --model runs/generative/dcgan/<run> --out samples/)")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(f"n and batch_size must be positive, got n={cfg.n}, batch_size={cfg.batch_size}")
    model_file = resolve_model_file(cfg.model)
    model, meta = load_generator(model_file, cfg.device)
    if meta["kind"] == "ddpm_unet":
        images = ddpm_sample(model, cfg.n, cfg.seed, meta, cfg.batch_size)
    else:
        images = generate(model, latent_noise(cfg.n, int(meta["latent_dim"]), cfg.seed), cfg.batch_size)
    out = Path(cfg.out).expanduser()
    write_samples(images, out, cfg, model_file, meta)
    print(f"wrote {cfg.n} samples {list(images.shape[1:])} from {model_file} (seed {cfg.seed}) to {out}")
    return out


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
