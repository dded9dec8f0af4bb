"""Parts shared by ``generative/vae.py`` and ``generative/dcgan.py``; the training loops stay in the scripts.

Mirrors ``pretrain/common.py`` (same option names, run-folder and resume rules) so every stage behaves
alike. ``resolve_run_dir`` and ``image_loader`` are copies of the pretraining ones, because the entry
folders are not importable from each other; they belong in :mod:`medpretrain.training` (noted for its owner).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medpretrain.checkpoint import BackboneMeta, save_backbone
from medpretrain.config import ConfigError, DataConfig, config_to_dict
from medpretrain.data import MedicalDataset, build_dataset
from medpretrain.training import list_checkpoints
from medpretrain.utils import PROJECT_ROOT, atomic_write_text


@dataclasses.dataclass
class GenTrainConfig:
    """Optimisation, precision, logging, watching and fault-tolerance options shared by VAE and DCGAN."""

    epochs: int = 1
    """Passes over the training split (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """> 0: stop after exactly this many optimizer steps (a step budget for tests and benchmarks)."""
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    cache_on_device: bool = True
    """Keep the decoded split as one tensor on the training device (see ``pretrain/common.py``)."""
    log_every: int = 5
    """Optimizer steps between CSV / tracker rows and NaN checks."""
    checkpoint_every: int = 50
    """Optimizer steps between ``accelerator.save_state`` checkpoints (0: only at the end)."""
    checkpoint_total_limit: int = 2
    resume: str = ""
    """``auto``: continue the newest unfinished run (or ``run_name``); a checkpoint path; empty: fresh."""
    sample_every: int = 1
    """Epochs between sample grids ``samples_epochXXX.png`` (a grid is always written at the end)."""
    grid_size: int = 64
    """Images in each sample grid (fixed latents, so grids of successive epochs are comparable)."""
    log_with: str = "tensorboard"
    """accelerate tracker (``tensorboard``, ``wandb`` ...) or ``none``; metrics.csv is always written."""


def check_data_config(data: DataConfig) -> None:
    """Generators end in ``tanh``: the data must be normalised to [-1, 1] (mean 0.5, std 0.5)."""
    if data.mean != 0.5 or data.std != 0.5:
        raise ConfigError(
            f"generative models output [-1, 1] (tanh), so data.mean and data.std must be 0.5 "
            f"(got mean={data.mean}, std={data.std})"
        )


def resolve_run_dir(out_dir: str, run_name: str, resume: str) -> tuple[Path, bool]:
    """The run folder and whether it already exists (same rules as ``pretrain/common.py``)."""
    base = Path(out_dir)
    if not base.is_absolute():
        base = PROJECT_ROOT / base
    if resume.strip().lower() == "auto" and not run_name:
        candidates = [
            d for d in base.glob("*")
            if d.is_dir() and list_checkpoints(d / "checkpoints") and not (d / "backbone.safetensors").exists()
        ]
        if candidates:
            return max(candidates, key=lambda d: d.stat().st_mtime), True
    if resume and resume.strip().lower() not in ("auto", "none") and not run_name:
        return Path(resume).expanduser().resolve().parent.parent, True
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / name
    return run_dir, run_dir.exists()


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def image_loader(
    ds: MedicalDataset, batch_size: int, cache_on_device: bool, device: torch.device, num_workers: int = 0
) -> tuple[DataLoader, torch.Generator, Callable[[Any], torch.Tensor]]:
    """A shuffling ``drop_last`` loader, its sampler generator (re-seed per epoch for a resumable order)
    and a function from a batch to images ``[B, C, H, W]`` on ``device``."""
    if len(ds) < batch_size:
        raise ValueError(f"training split has {len(ds)} images, fewer than batch_size={batch_size}")
    gen = torch.Generator()
    if cache_on_device:
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        loader = DataLoader(_Indices(len(ds)), batch_size=batch_size,
                            sampler=RandomSampler(range(len(ds)), generator=gen), drop_last=True)
        return loader, gen, lambda idx: images[idx.to(device)]
    loader = DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds, generator=gen), drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    return loader, gen, lambda batch: batch["image"].to(device, non_blocking=True)


def load_split(data: DataConfig, split: str) -> tuple[MedicalDataset, int]:
    """An unlabeled split and its square image size; ``ValueError`` for non-square images."""
    ds = build_dataset(data, split, unlabeled=True)
    h, w = ds[0]["image"].shape[-2:]
    if h != w:
        raise ValueError(f"{data.dataset}: generative models need square images, got {h}x{w}; set data.image_size")
    return ds, int(h)


def export_backbone(path: Path, backbone: Any, cfg: Any, ds: MedicalDataset, method: str, image_size: int,
                    steps: int, epochs: int, extra: dict[str, Any]) -> Path:
    """Write the contract checkpoint (:func:`medpretrain.checkpoint.save_backbone`) with full metadata."""
    meta = BackboneMeta(
        arch=backbone.arch, in_channels=backbone.in_channels, stem=backbone.stem, image_size=image_size,
        mean=cfg.data.mean, std=cfg.data.std, method=method, dataset=ds.spec, dataset_hash=ds.fingerprint,
        epochs=epochs, steps=steps, config=config_to_dict(cfg), extra=extra,
    )
    return save_backbone(path, backbone, meta)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fault_hook(step: int) -> None:
    """Test-only: ``MEDPRETRAIN_FAULT_EXIT_AT_STEP=k`` hard-exits right after optimizer step ``k``."""
    at = os.environ.get("MEDPRETRAIN_FAULT_EXIT_AT_STEP")
    if at and int(at) == step:
        os._exit(137)


def inject_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Test-only: ``MEDPRETRAIN_FAULT_NAN_AT_STEP=k`` turns the loss of step ``k`` into NaN."""
    at = os.environ.get("MEDPRETRAIN_FAULT_NAN_AT_STEP")
    if at and int(at) == step:
        return loss * float("nan")
    return loss
