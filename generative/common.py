"""Parts shared by ``generative/vae.py`` and ``generative/dcgan.py``; the training loops stay in the scripts.

Mirrors ``pretrain/common.py`` (same option names, run-folder and resume rules) so every stage behaves
alike; the run-folder, loader, export and fault-injection helpers live in :mod:`medpretrain.training`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import MedicalDataset, build_dataset
from medpretrain.training import (  # noqa: F401  (re-exported for the scripts)
    export_backbone,
    fault_hook,
    image_loader,
    inject_nan,
    resolve_run_dir,
)
from medpretrain.utils import atomic_write_text


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


def load_split(data: DataConfig, split: str) -> tuple[MedicalDataset, int]:
    """An unlabeled split and its square image size; ``ValueError`` for non-square images."""
    ds = build_dataset(data, split, unlabeled=True)
    h, w = ds[0]["image"].shape[-2:]
    if h != w:
        raise ValueError(f"{data.dataset}: generative models need square images, got {h}x{w}; set data.image_size")
    return ds, int(h)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


