"""Draw synthetic scans from a trained VAE decoder, DCGAN generator or DDPM UNet, reproducibly.

    python generative/sample.py --model runs/generative/dcgan/<run>/generator.safetensors --n 1000 --out samples/
    python generative/sample.py --model runs/generative/vae/<run> --n 1000 --out samples/ --seed 1
    python generative/sample.py model=runs/generative/ddpm/<cond-run> per_class=500 out=samples/
    python generative/sample.py model=runs/generative/dcgan/<cond-run> per_class=100 "classes=[pneumonia]" out=s/

``--model`` is a ``decoder.safetensors`` / ``generator.safetensors`` / ``unet.safetensors`` written by
``generative/vae.py`` / ``dcgan.py`` / ``ddpm.py`` (or their run folder; DDPM samples by 50-step DDIM). Latents come from a CPU generator seeded with ``--seed``,
so the same model and seed give the same images (and a byte-identical ``samples.npz``).

A class-conditional model (trained with ``conditional=true``; its metadata has ``num_classes`` and
``class_names``) draws class by class: ``per_class=<n>`` samples of every class, or of the classes listed in
``classes=[...]`` (names or indices, in that order); without ``per_class`` the ``n`` samples are spread over
them evenly (``mix=even``, the default; the first ``n % K`` classes get one more) or in proportion to the
model's training images per class (``mix=data``: the real class mix, by largest remainders, every class at
least one). Class ``c``'s latents / noise come from its own seed
(:func:`medpretrain.generative.conditioning.class_seed` of ``seed`` and ``c``), so its samples do not depend
on which other classes are drawn. An unconditional model refuses ``per_class`` and ``classes``.
``guidance_scale``: classifier-free guidance of a conditional DDPM trained with ``class_dropout`` (0: the
model's own).

Writes into ``--out``: ``png/sample_00000.png`` ... (8-bit grey, or RGB for 3-channel models),
``samples.npz`` (``images``: uint8 in MedMNIST layout ``[N, H, W]`` or ``[N, H, W, 3]``, ``seed``; from a
conditional model also ``labels``, int64 ``[N]`` class indices, and ``class_names``, a unicode array of all
the model's classes that ``labels`` index; no pickled objects), ``grid.png`` (the first ``grid`` samples)
and ``samples.json`` (model file, its sha256, seed, per-class counts, metadata).
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
from medpretrain.data.splits import _round_counts
from medpretrain.generative.ddpm import ddpm_sample
from medpretrain.generative.sampling import (
    MIXES,
    build_generator,
    generate,
    latent_noise,
    sample_classes,
    save_npz,
)
from medpretrain.images import save_grid, to_uint8
from medpretrain.utils import atomic_write_text, sha256_file

MODEL_FILES = ("generator.safetensors", "decoder.safetensors", "unet.safetensors")


@dataclasses.dataclass
class SampleConfig:
    model: str = ""
    """A decoder / generator ``.safetensors`` file, or a run folder holding one."""
    n: int = 1000
    """Samples in all (a conditional model: spread over the classes by ``mix``); ignored with ``per_class``."""
    mix: str = "even"
    """How a conditional model's ``n`` samples are spread over the classes: ``even``, or ``data``: in proportion
    to the model's training images per class (the real class mix, so that an audit's overall FID / KID /
    precision / recall and its discriminators compare like with like). Unconditional models sample the data's
    mix by construction."""
    per_class: int = 0
    """> 0: this many samples of every class (of ``classes``); conditional models only."""
    classes: list[str] = dataclasses.field(default_factory=list)
    """The classes to draw, by name or index (empty: all); conditional models only."""
    guidance_scale: float = 0.0
    """Classifier-free guidance weight of a conditional DDPM with a null class (0: the model's ``guidance_scale``)."""
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


def resolve_classes(requested: list[str], class_names: list[str]) -> list[int]:
    """Class indices of ``requested`` (names, else integer indices; empty: every class), in that order.
    ``ConfigError`` naming ``classes`` for an unknown or repeated class."""
    if not requested:
        return list(range(len(class_names)))
    chosen: list[int] = []
    for item in requested:
        if item in class_names:
            index = class_names.index(item)
        elif item.isdigit() and int(item) < len(class_names):
            index = int(item)
        else:
            raise ConfigError(f"classes: {item!r} is neither a class of this model nor an index 0..{len(class_names) - 1} "
                              f"(its classes: {class_names})")
        if index in chosen:
            raise ConfigError(f"classes: {class_names[index]!r} is listed twice")
        chosen.append(index)
    return chosen


def training_class_counts(meta: dict[str, Any], model_file: Path) -> list[int]:
    """Training images per class of a conditional model: its ``class_counts`` metadata, or, for a model
    exported before that was recorded, the labels of the training split its config names, read again."""
    if meta.get("class_counts"):
        return [int(k) for k in meta["class_counts"]]
    from medpretrain.config import DataConfig, resolve_config
    from medpretrain.data import build_dataset
    from medpretrain.generative.stage import class_labels

    data = meta.get("config", {}).get("data")
    if not data:
        raise ConfigError(f"mix=data: {model_file} records neither class_counts nor its data config; use mix=even")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    dcfg = resolve_config(DataConfig, values={k: v for k, v in data.items() if k in known})
    labels, names = class_labels(build_dataset(dcfg, "train", unlabeled=True))
    if names != list(meta["class_names"]):
        raise ConfigError(f"mix=data: the training data of {model_file} now has classes {names}, the model "
                          f"{meta['class_names']}; use mix=even")
    return torch.bincount(labels, minlength=len(names)).tolist()


def proportional(n: int, weights: list[int]) -> list[int]:
    """``n`` split in proportion to ``weights`` by largest remainders (ties: the earlier class), every class
    with a positive weight getting at least one while ``n`` allows."""
    total = sum(weights)
    if total <= 0:
        raise ConfigError("mix=data: the model's training classes are all empty")
    counts = _round_counts(np.asarray(weights), n / total).tolist()  # the splits' largest-remainder rounding
    for i, w in enumerate(weights):  # a rare class keeps one sample, taken from the largest
        if w > 0 and counts[i] == 0 and n >= sum(1 for x in weights if x > 0):
            counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
            counts[i] = 1
    return counts


def class_counts(cfg: SampleConfig, meta: dict[str, Any], model_file: Path | None = None) -> list[tuple[int, int]]:
    """``(class index, samples)`` to draw from a conditional model: ``per_class`` of each chosen class, or
    ``n`` spread over them evenly (``mix=even``) or in the training images' proportions (``mix=data``)."""
    chosen = resolve_classes(cfg.classes, list(meta["class_names"]))
    if cfg.per_class > 0:
        return [(c, cfg.per_class) for c in chosen]
    if cfg.mix == "data":
        train = training_class_counts(meta, model_file or Path(cfg.model))
        return list(zip(chosen, proportional(cfg.n, [train[c] for c in chosen]), strict=True))
    q, r = divmod(cfg.n, len(chosen))
    return [(c, q + (i < r)) for i, c in enumerate(chosen)]


def write_samples(images: torch.Tensor, out: Path, cfg: SampleConfig, model_file: Path, meta: dict[str, Any],
                  labels: torch.Tensor | None = None) -> None:
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
    arrays = {"images": array, "seed": np.asarray(cfg.seed, dtype=np.int64)}
    info: dict[str, Any] = {"model": str(model_file), "model_sha256": sha256_file(model_file), "n": len(array),
                            "seed": cfg.seed}
    if labels is not None:  # the format fine-tuning's synthetic augmentation reads: labels index class_names
        names = list(meta["class_names"])
        arrays.update(labels=labels.numpy().astype(np.int64), class_names=np.asarray(names, dtype=np.str_))
        counts = np.bincount(arrays["labels"], minlength=len(names))
        info.update(class_names=names, per_class={names[c]: int(k) for c, k in enumerate(counts) if k},
                    guidance_scale=cfg.guidance_scale or meta.get("guidance_scale"))
    save_npz(out / "samples.npz", arrays)
    save_grid(images[: cfg.grid], out / "grid.png")
    info.update(shape=list(array.shape), dtype="uint8", range=[0, 255],
                generator={k: v for k, v in meta.items() if k != "config"})
    atomic_write_text(out / "samples.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(SampleConfig, argv)
    if not cfg.model or not cfg.out:
        raise ConfigError("--model and --out are required (e.g. --model runs/generative/dcgan/<run> --out samples/)")
    if cfg.n < 1 or cfg.batch_size < 1 or cfg.per_class < 0 or cfg.guidance_scale < 0:
        raise ConfigError(f"n and batch_size must be positive, per_class and guidance_scale >= 0, got n={cfg.n}, "
                          f"batch_size={cfg.batch_size}, per_class={cfg.per_class}, guidance_scale={cfg.guidance_scale}")
    if cfg.mix not in MIXES:
        raise ConfigError(f"mix must be one of {', '.join(MIXES)}, got {cfg.mix!r}")
    model_file = resolve_model_file(cfg.model)
    model, meta = load_generator(model_file, cfg.device)
    labels = None
    if meta.get("num_classes"):
        if cfg.seed < 0:
            raise ConfigError(f"seed must be >= 0 for a class-conditional model (class seeds derive from it), got {cfg.seed}")
        if cfg.guidance_scale not in (0.0, 1.0) and meta.get("null_class") is None:
            raise ConfigError(f"guidance_scale={cfg.guidance_scale}: {model_file} has no null class to guide with "
                              "(a conditional DDPM trained with class_dropout > 0 has)")
        counts = class_counts(cfg, meta, model_file)
        images, labels = sample_classes(model, meta, counts, cfg.seed, cfg.batch_size, cfg.guidance_scale or None)
    elif cfg.per_class or cfg.classes or cfg.guidance_scale:
        raise ConfigError(f"per_class, classes and guidance_scale need a class-conditional model, but {model_file} is "
                          "unconditional (trained with conditional=false); use n=<count>")
    elif meta["kind"] == "ddpm_unet":
        images = ddpm_sample(model, cfg.n, cfg.seed, meta, cfg.batch_size)
    else:
        images = generate(model, latent_noise(cfg.n, int(meta["latent_dim"]), cfg.seed), cfg.batch_size)
    out = Path(cfg.out).expanduser()
    write_samples(images, out, cfg, model_file, meta, labels)
    per = f", {len(counts)} classes" if labels is not None else ""
    print(f"wrote {len(images)} samples {list(images.shape[1:])}{per} from {model_file} (seed {cfg.seed}) to {out}")
    return out


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
