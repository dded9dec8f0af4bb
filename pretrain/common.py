"""Parts shared by ``pretrain/simclr.py`` and ``pretrain/moco.py``; the training loops stay in the scripts.

Holds the common config group (:class:`TrainConfig`), the run folder and resume resolution, the image
loader (whole split cached on the training device by default), the kNN monitor and the backbone export.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medpretrain.checkpoint import BackboneMeta, save_backbone
from medpretrain.config import DataConfig, config_to_dict
from medpretrain.data import MedicalDataset, build_dataset
from medpretrain.knn import extract_features, knn_accuracy
from medpretrain.training import list_checkpoints
from medpretrain.utils import PROJECT_ROOT


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, precision, logging and fault-tolerance options shared by SimCLR and MoCo."""

    epochs: int = 1
    """Passes over the pretraining split (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """> 0: stop after exactly this many optimizer steps (a step budget, used by tests and benchmarks)."""
    batch_size: int = 128
    """Images per process per micro-batch; the contrastive batch is ``batch_size x processes``."""
    grad_accum: int = 1
    """Gradient accumulation steps (note: contrastive negatives come from one micro-batch only)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.06
    """Peak learning rate for a global batch of 128, scaled linearly with the global batch
    (lightly's SimCLR/MoCo examples and benchmarks: SGD, lr 0.06 at batch 128)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay to 0."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    compile: bool = False
    """``torch.compile`` the model (first steps are slow while it compiles)."""
    sync_bn: bool = False
    """SyncBatchNorm across processes (only with more than one process on GPUs)."""
    seed: int = 0
    cache_on_device: bool = True
    """Keep the decoded split as one tensor on the training device and index batches from it: the
    loader then costs nothing. Turn off for datasets larger than device memory (a DataLoader with
    ``data.num_workers`` workers is used instead)."""
    log_every: int = 5
    """Optimizer steps between CSV/TensorBoard rows (and NaN checks)."""
    checkpoint_every: int = 50
    """Optimizer steps between ``accelerator.save_state`` checkpoints (0: only at the end)."""
    checkpoint_total_limit: int = 2
    """Checkpoints kept (>= 2, so a kill mid-write always leaves a complete one)."""
    resume: str = ""
    """``auto``: continue the newest unfinished run (or ``run_name``) from its latest complete
    checkpoint; a path: that checkpoint folder; empty: start fresh."""
    knn_every: int = 1
    """Epochs between kNN evaluations on the labelled validation split (0: only at the end; -1: never)."""
    knn_k: int = 20
    knn_t: float = 0.07
    knn_split: Literal["val", "train"] = "val"
    """Where the kNN bank's labels come from: ``val`` = leave-one-out within the validation split (no
    training labels are touched), ``train`` = train-split labels as the bank, validation as queries."""


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


def resolve_run_dir(out_dir: str, run_name: str, resume: str) -> tuple[Path, bool]:
    """The run folder and whether it already exists (a resume).

    ``out_dir`` relative paths resolve against the project root. With ``resume=auto`` and no
    ``run_name``, the newest run under ``out_dir`` that has a complete checkpoint but no exported
    backbone yet (an interrupted run) is continued; if there is none a new run starts.
    """
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
        # An explicit checkpoint path: the run folder is its grandparent (<run>/checkpoints/checkpoint_i).
        return Path(resume).expanduser().resolve().parent.parent, True
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / name
    return run_dir, run_dir.exists()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


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
    """A shuffling, ``drop_last`` loader (equal batches on every process, as the gathered NT-Xent
    needs), its sampler generator (re-seed per epoch for resumable order) and a function from a
    batch to images ``[B, C, H, W]`` on ``device``.

    With ``cache_on_device`` the loader yields indices into the split, stacked once on ``device``.
    """
    if len(ds) < batch_size:
        raise ValueError(f"pretraining split has {len(ds)} images, fewer than batch_size={batch_size}")
    gen = torch.Generator()
    if cache_on_device:
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        loader = DataLoader(_Indices(len(ds)), batch_size=batch_size, sampler=RandomSampler(range(len(ds)), generator=gen),
                            drop_last=True)
        return loader, gen, lambda idx: images[idx.to(device)]
    loader = DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds, generator=gen), drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    return loader, gen, lambda batch: batch["image"].to(device, non_blocking=True)


class KNNMonitor:
    """kNN accuracy of the backbone on labelled data (see :mod:`medpretrain.knn`)."""

    def __init__(self, data: DataConfig, split: str, k: int, t: float, batch_size: int = 256):
        self.k, self.t = k, t
        val = build_dataset(data, "val")
        self.val = DataLoader(val, batch_size=batch_size)
        self.bank = DataLoader(build_dataset(data, "train"), batch_size=batch_size) if split == "train" else None
        self.num_classes = val.num_classes
        self.n = len(val)

    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> float:
        q, ql = extract_features(backbone, self.val, device)
        if self.bank is None:
            return knn_accuracy(q, ql, num_classes=self.num_classes, k=self.k, t=self.t)
        b, bl = extract_features(backbone, self.bank, device)
        return knn_accuracy(q, ql, b, bl, num_classes=self.num_classes, k=self.k, t=self.t)


# --------------------------------------------------------------------------------------------
# Export and logging helpers
# --------------------------------------------------------------------------------------------


def export_backbone(
    path: Path, backbone: Any, cfg: Any, ds: MedicalDataset, method: str, image_size: int,
    steps: int, epochs: int, extra: dict[str, Any],
) -> Path:
    """Write the contract checkpoint (``medpretrain.checkpoint.save_backbone``) with full metadata."""
    meta = BackboneMeta(
        arch=backbone.arch, in_channels=backbone.in_channels, stem=backbone.stem, image_size=image_size,
        mean=cfg.data.mean, std=cfg.data.std, method=method, dataset=ds.spec, dataset_hash=ds.fingerprint,
        epochs=epochs, steps=steps, config=config_to_dict(cfg), extra=extra,
    )
    return save_backbone(path, backbone, meta)


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.06, ...}`` with scalars only (TensorBoard's hparams refuse lists and None)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    walk("", config_to_dict(cfg))
    return out


def fault_hook(step: int) -> None:
    """Test-only fault injection: ``MEDPRETRAIN_FAULT_EXIT_AT_STEP=k`` hard-exits (like SIGKILL, no
    cleanup) right after optimizer step ``k``."""
    at = os.environ.get("MEDPRETRAIN_FAULT_EXIT_AT_STEP")
    if at and int(at) == step:
        os._exit(137)


def inject_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Test-only: ``MEDPRETRAIN_FAULT_NAN_AT_STEP=k`` turns the loss of step ``k`` into NaN."""
    at = os.environ.get("MEDPRETRAIN_FAULT_NAN_AT_STEP")
    if at and int(at) == step:
        return loss * float("nan")
    return loss
