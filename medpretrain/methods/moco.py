"""MoCo v2 (Chen et al. 2020, https://arxiv.org/abs/2003.04297) as lightly's MoCo example wires it.

Query encoder (backbone + ``MoCoProjectionHead``), a momentum copy updated with ``update_momentum`` under a
cosine schedule (``cosine_schedule``, from ``momentum`` to 1), and ``NTXentLoss(memory_bank_size=(queue,
dim))``: the queue of negatives is lightly's memory bank. With several processes keys are gathered into the
queue on every process (``gather_distributed``) and the key batch is shuffled across processes for the key
encoder's BatchNorm (MoCo's "shuffling BN", lightly's ``batch_shuffle(distributed=True)``).

**Split-batch BatchNorm on one process** (``moco.split_bn``). Shuffling BN exists because BatchNorm leaks
information between the samples of a batch: if a query and its key are normalised with statistics of the
same samples, the encoder can find the positive through the batch statistics instead of the image content
(He et al. 2020, section 3.3; the loss falls while the features do not improve). With one process
``batch_shuffle`` is a no-op for BatchNorm: a permuted batch has the same statistics. ``split_bn=auto``
therefore, with one process, runs the query encoder on ``bn_splits`` groups of the batch and the key encoder
on ``bn_splits`` groups of the *shuffled* batch, each group with its own BatchNorm statistics: the
single-device simulation of ``bn_splits`` GPUs that lightly's ``SplitBatchNorm`` and its MoCo CIFAR-10
example use (here by running the groups one after another, so the backbone and its exported keys stay
unchanged). With several processes shuffling BN does the job and ``auto`` leaves it off; ``off`` keeps the
full-batch statistics (the behaviour before this option); ``on`` splits on any number of processes.
On the command line: ``moco.split_bn=off`` (YAML reads on/off as booleans).

The queue lives in non-persistent buffers of lightly's memory bank; :meth:`MoCo.checkpoint_state` hands them
to the checkpoint (saved without pickle).

    accelerate launch pretrain/moco.py train.epochs=5 moco.queue_size=4096 moco.split_bn=off
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.config import ConfigError
from medpretrain.methods.base import MomentumMethod, momentum_copy, pretrain_config, register_method
from medpretrain.methods.registry import StageInfo
from medpretrain.resume import BufferState


@dataclass
class MoCoMethodConfig:
    hidden_dim: int = 512
    """Projection head hidden width (MoCo v2: a 2-layer MLP head; lightly's example uses 512 for ResNet-18)."""
    output_dim: int = 128
    temperature: float = 0.2
    """InfoNCE temperature (MoCo v2: 0.2)."""
    queue_size: int = 1024
    """Negatives kept in the queue. MoCo uses 65536 on ImageNet's 1.28M images; the queue must stay well
    below the dataset size or it holds stale keys of the very images being contrasted: at most
    :data:`MAX_QUEUE_FRACTION` of the pretraining images (:meth:`MoCo.check_data`; ``configs/moco.yaml`` sets
    1024 for PneumoniaMNIST's 3882 training images)."""
    momentum: float = 0.99
    """Starting momentum of the key encoder, raised to 1 with a cosine schedule (lightly's MoCo v2
    benchmark uses 0.996 for long runs; short runs need the faster-moving 0.99)."""
    symmetric: bool = False
    """Also contrast (key view -> query view), doubling the compute (MoCo v3 style); v2 is asymmetric."""
    split_bn: Literal["auto"] | bool = "auto"
    """Split-batch BatchNorm (see the module docstring): ``auto`` = on with one process, off with several;
    ``on``/``true`` or ``off``/``false`` (YAML reads on/off as booleans)."""
    bn_splits: int = 8
    """Groups with their own BatchNorm statistics when split BN is on (lightly's MoCo CIFAR-10 example: 8)."""

    def __post_init__(self) -> None:
        if self.bn_splits < 2:
            raise ConfigError(f"config key 'moco.bn_splits': needs at least 2 groups, got {self.bn_splits}")


MoCoConfig = pretrain_config("moco", MoCoMethodConfig, "MoCoConfig", __name__)

MAX_QUEUE_FRACTION = 0.5
"""Largest queue, as a fraction of the pretraining images, that :meth:`MoCo.check_data` accepts. Why: with a
fresh permutation every epoch, a query's own key from the previous epoch is still queued with probability
about ``(queue / images)**2 / 2`` (one query in eight at one half), and every time once the queue exceeds
the images; such a key is a near-positive contrasted as a negative."""


def check_queue(option: str, queue_size: int, n_images: int) -> None:
    """Refuse a queue (config key ``option``) larger than :data:`MAX_QUEUE_FRACTION` of the ``n_images``
    pretraining images (:class:`~medpretrain.config.ConfigError`)."""
    limit = int(n_images * MAX_QUEUE_FRACTION)
    if queue_size > limit:
        raise ConfigError(f"{option}={queue_size} is not well below the {n_images} pretraining "
                          f"images: at most {limit} (half of them), or the queue holds stale keys of the "
                          "images being contrasted")


def split_forward(encoder: Callable[[Tensor], Tensor], x: Tensor, groups: int) -> Tensor:
    """``encoder`` applied to ``groups`` consecutive chunks of ``x`` (each with its own BatchNorm statistics)."""
    if groups <= 1:
        return encoder(x)
    return torch.cat([encoder(chunk) for chunk in x.chunk(groups)])


def reseed_shuffle(gen: torch.Generator, step: int) -> None:
    """Re-seed the split-BN key-group generator for optimizer ``step`` (from the run's seed and the step only),
    so the groups are replayed exactly on resume and do not depend on what else drew random numbers."""
    gen.manual_seed((torch.initial_seed() + step * 0x9E3779B1) % 2**63)


class MoCo(MomentumMethod):
    """Query encoder, momentum key encoder, memory bank and InfoNCE loss (lightly's MoCo example)."""

    title = "MoCo v2"
    momentum_pairs = (("backbone", "backbone_momentum"), ("projection_head", "projection_head_momentum"))

    def __init__(self, backbone: Backbone, cfg: MoCoMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.cfg = cfg
        self.distributed = processes > 1
        split = processes == 1 if cfg.split_bn == "auto" else bool(cfg.split_bn)
        self.bn_groups = cfg.bn_splits if split else 1
        self.projection_head = MoCoProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        # The key encoder is a frozen copy that only moves by momentum: it gets no gradient.
        self.backbone_momentum = momentum_copy(self.backbone)
        self.projection_head_momentum = momentum_copy(self.projection_head)
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, cfg.output_dim),
                                    gather_distributed=True)
        self.shuffle_gen = torch.Generator()  # split BN on one process: the key groups (reseed_shuffle)

    def check_data(self, n_images: int) -> None:
        """Refuse a queue larger than :data:`MAX_QUEUE_FRACTION` of the ``n_images`` pretraining images
        (:func:`check_queue`)."""
        check_queue("moco.queue_size", self.cfg.queue_size, n_images)

    def query(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def key_encoder(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    @torch.no_grad()
    def key(self, x: Tensor) -> Tensor:
        # Shuffling BN: keys computed on a batch permuted across processes (alone: split into groups instead).
        if self.bn_groups > 1 and not self.distributed:
            shuffle = torch.randperm(x.shape[0], generator=self.shuffle_gen).to(x.device)
            xs = x[shuffle]
        else:
            xs, shuffle = batch_shuffle(x, distributed=self.distributed)
        return batch_unshuffle(split_forward(self.key_encoder, xs, self.bn_groups), shuffle,
                               distributed=self.distributed).float()

    def before_step(self, step: int, total_steps: int) -> None:
        reseed_shuffle(self.shuffle_gen, step)
        self.update_targets(step, total_steps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        loss = self.criterion(split_forward(self.query, x0, self.bn_groups).float(), self.key(x1))
        if self.cfg.symmetric:
            key0 = self.key(x0)
            loss = 0.5 * (loss + self.criterion(split_forward(self.query, x1, self.bn_groups).float(), key0))
        return loss

    def checkpoint_state(self) -> dict[str, Any]:
        return {"memory_bank": BufferState(self.criterion.memory_bank, ["bank", "bank_ptr"])}


register_method(StageInfo("moco", "selfsup", "pretrain/moco.py", "configs/moco.yaml", "runs/pretrain/moco",
                          description="MoCo v2 (Chen et al. 2020)", schema=f"{__name__}:MoCoConfig"),
                MoCo, MoCoConfig)
