"""Parts shared by ``pretrain/simclr.py`` and ``pretrain/moco.py``; the training loops stay in the scripts.

Holds the common config group (:class:`TrainConfig`), the run folder and resume resolution, the image
loader (whole split cached on the training device by default), the kNN monitor and the backbone export.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.utils.data import DataLoader

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset
from medpretrain.knn import extract_features, knn_accuracy
from medpretrain.training import (  # noqa: F401  (re-exported for the scripts)
    export_backbone,
    fault_hook,
    flat_config,
    image_loader,
    inject_nan,
    resolve_run_dir,
)


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


def knn_monitor(data: DataConfig, split: str, k: int, t: float, every: int) -> KNNMonitor | None:
    """The kNN monitor, or ``None`` when it is switched off (``every < 0``) or the data has no image
    labels to score (segmentation masks, unlabeled folders): pretraining itself needs no labels."""
    if every < 0:
        return None
    if build_dataset(data, "val").task not in ("binary", "multiclass"):
        return None
    return KNNMonitor(data, split, k, t)


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
