"""DenseCL (Wang et al. 2021, https://arxiv.org/abs/2011.09157) as lightly's DenseCL example wires it, on MoCo v2.

A dense objective for pretraining that should help segmentation. Query encoder: the backbone's spatial map
before pooling (:meth:`~medpretrain.backbones.Backbone.forward_map`, the map the contract backbone averages),
then two ``DenseCLProjectionHead`` MLPs: a global one on the averaged map and a dense one applied at every
location (the paper's 1x1-conv head). Key encoder: momentum copies of the three, moved by ``update_momentum``
under a cosine schedule from ``momentum`` to 1, as in :mod:`.moco`. Correspondence: each query location is
paired with the key location whose *backbone* feature is the most similar (cosine; lightly's
``select_most_similar``, the paper's rule). Loss: ``(1 - dense_weight) * global + dense_weight * dense``, both
lightly's ``NTXentLoss`` (InfoNCE; the paper's lambda is 0.5), negatives gathered across processes; with a
queue (``queue_size`` global keys, ``dense_queue_size`` location keys: lightly's memory banks, 4096 each in its
example) the negatives come from the queues, with 0 from the batch (both views, every location).

Departures from lightly's example: the keys come from the momentum copies (the paper; the example's
``forward_momentum`` calls the query modules); split-batch BatchNorm on one process (``split_bn``) as for
MoCo, because the same BatchNorm leak lets a query find its key through the batch statistics; both queues
must stay well below the pretraining images (:func:`.moco.check_queue`; the dense queue holds
``h * w`` keys per image).

Suits patch pretraining (``train.patch_size``): the two views are crops of one patch, and the dense loss asks
every location of one view to pick out its counterpart in the other. The dense map is coarse for stride-32
encoders: 2x2 locations on a 64 px patch with ResNet-18's standard stem (8x8 with the small stem).

    accelerate launch pretrain/train.py method=densecl train.epochs=5 densecl.dense_weight=0.5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import DenseCLProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, select_most_similar
from torch import Tensor, nn

from medpretrain.backbones import Backbone
from medpretrain.config import ConfigError
from medpretrain.methods.base import (
    GENERIC_SCRIPT,
    MomentumMethod,
    momentum_copy,
    pretrain_config,
    register_method,
)
from medpretrain.methods.moco import MAX_QUEUE_FRACTION, check_queue, reseed_shuffle
from medpretrain.methods.registry import StageInfo
from medpretrain.resume import BufferState

Encoded = tuple[Tensor, Tensor, Tensor]
"""Backbone features ``[B, h*w, C]``, global projection ``[B, D]``, dense projections ``[B, h*w, D]``."""


@dataclass
class DenseCLMethodConfig:
    hidden_dim: int = 512
    """Hidden width of both projection heads (lightly's ResNet-18 example: 512; the paper: 2048)."""
    output_dim: int = 128
    temperature: float = 0.2
    """InfoNCE temperature of both losses (DenseCL, as MoCo v2: 0.2)."""
    dense_weight: float = 0.5
    """The paper's lambda: loss = (1 - lambda) * global + lambda * dense (0.5 in the paper and lightly's example)."""
    queue_size: int = 1024
    """Global negatives kept in lightly's memory bank (0: in-batch negatives); at most
    :data:`~.moco.MAX_QUEUE_FRACTION` of the pretraining images (``configs/densecl.yaml``: 1024 of
    PneumoniaMNIST's 3882)."""
    dense_queue_size: int = 4096
    """Location keys kept in the dense memory bank (lightly's example: 4096; 0: in-batch). A step adds
    ``batch x h x w`` of them, so it holds ``dense_queue_size / (h w)`` images' keys: at most half the images."""
    momentum: float = 0.99
    """Starting momentum of the key encoder, raised to 1 with a cosine schedule (the paper: 0.999)."""
    split_bn: Literal["auto"] | bool = "auto"
    """Split-batch BatchNorm as ``moco.split_bn``: ``auto`` = on with one process, off with several."""
    bn_splits: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ConfigError(f"config key 'densecl.dense_weight': must lie in [0, 1], got {self.dense_weight}")
        if self.queue_size < 0 or self.dense_queue_size < 0:
            raise ConfigError("config keys 'densecl.queue_size' / 'densecl.dense_queue_size': must be >= 0")
        if self.bn_splits < 2:
            raise ConfigError(f"config key 'densecl.bn_splits': needs at least 2 groups, got {self.bn_splits}")


DenseCLConfig = pretrain_config("densecl", DenseCLMethodConfig, "DenseCLConfig", __name__)


def split_encode(encoder: Callable[[Tensor], Encoded], x: Tensor, groups: int) -> Encoded:
    """``encoder`` on ``groups`` consecutive chunks of ``x`` (each with its own BatchNorm statistics), outputs
    concatenated back in batch order (:func:`.moco.split_forward` for an encoder with three outputs)."""
    if groups <= 1:
        return encoder(x)
    parts = [encoder(chunk) for chunk in x.chunk(groups)]
    f, g, d = (torch.cat(p) for p in zip(*parts, strict=True))
    return f, g, d


def dense_pairs(q_features: Tensor, k_features: Tensor, k_dense: Tensor) -> Tensor:
    """For every query location, the dense key projection at the key location of the most similar backbone
    feature (cosine): ``[B, N, D]`` from ``q_features`` / ``k_features`` ``[B, N, C]`` and ``k_dense``
    ``[B, N, D]`` (lightly's ``select_most_similar``; an argmax, so no gradient flows through the matching)."""
    return select_most_similar(q_features.detach().float(), k_features.float(), k_dense)


class DenseCL(MomentumMethod):
    """Query encoder with global and dense heads, their momentum copies, two InfoNCE losses (lightly's example)."""

    title = "DenseCL"
    momentum_pairs = (("backbone", "backbone_momentum"), ("projection_head", "projection_head_momentum"),
                      ("dense_head", "dense_head_momentum"))

    def __init__(self, backbone: Backbone, cfg: DenseCLMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.cfg = cfg
        self.distributed = processes > 1
        split = processes == 1 if cfg.split_bn == "auto" else bool(cfg.split_bn)
        self.bn_groups = cfg.bn_splits if split else 1
        self.projection_head = DenseCLProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.dense_head = DenseCLProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.backbone_momentum = momentum_copy(self.backbone)
        self.projection_head_momentum = momentum_copy(self.projection_head)
        self.dense_head_momentum = momentum_copy(self.dense_head)
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, cfg.output_dim),
                                    gather_distributed=True)
        self.dense_criterion = NTXentLoss(temperature=cfg.temperature,
                                          memory_bank_size=(cfg.dense_queue_size, cfg.output_dim),
                                          gather_distributed=True)
        self.shuffle_gen = torch.Generator()  # the key groups of split BN, re-seeded every step (as MoCo's)
        self.n_images: int | None = None

    def check_data(self, n_images: int) -> None:
        """Refuse a global queue above half the ``n_images`` (:func:`.moco.check_queue`); the dense queue is
        checked at the first batch, when the locations per image are known."""
        check_queue("densecl.queue_size", self.cfg.queue_size, n_images)
        self.n_images = n_images

    def _check_dense_queue(self, locations: int) -> None:
        if self.n_images is not None:
            limit = int(self.n_images * MAX_QUEUE_FRACTION) * locations
            if self.cfg.dense_queue_size > limit:
                raise ConfigError(f"densecl.dense_queue_size={self.cfg.dense_queue_size} holds the keys of more than "
                                  f"half the {self.n_images} pretraining images ({locations} locations each): at "
                                  f"most {limit}, or the queue holds stale keys of the images being contrasted")
            self.n_images = None  # checked once

    @staticmethod
    def encode(backbone: Backbone, head: nn.Module, dense_head: nn.Module, x: Tensor) -> Encoded:
        """Backbone features ``[B, h*w, C]``, global projection ``[B, D]``, dense projections ``[B, h*w, D]``."""
        fmap = backbone.forward_map(x)
        features = fmap.flatten(start_dim=2).transpose(1, 2)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)  # exactly what backbone(x) returns
        return features, head(pooled), dense_head(features)

    def query(self, x: Tensor) -> Encoded:
        return self.encode(self.backbone, self.projection_head, self.dense_head, x)

    def key_encoder(self, x: Tensor) -> Encoded:
        return self.encode(self.backbone_momentum, self.projection_head_momentum, self.dense_head_momentum, x)

    @torch.no_grad()
    def key(self, x: Tensor) -> Encoded:
        # Shuffling BN: keys computed on a batch permuted across processes (alone: split into groups instead).
        if self.bn_groups > 1 and not self.distributed:
            shuffle = torch.randperm(x.shape[0], generator=self.shuffle_gen).to(x.device)
            xs = x[shuffle]
        else:
            xs, shuffle = batch_shuffle(x, distributed=self.distributed)
        out = split_encode(self.key_encoder, xs, self.bn_groups)
        f, g, d = (batch_unshuffle(t, shuffle, distributed=self.distributed).float() for t in out)
        return f, g, d

    def before_step(self, step: int, total_steps: int) -> None:
        reseed_shuffle(self.shuffle_gen, step)
        self.update_targets(step, total_steps)

    def dense_loss(self, q_features: Tensor, k_features: Tensor, q_dense: Tensor, k_dense: Tensor) -> Tensor:
        """InfoNCE of every query location ``q_dense`` ``[B, N, D]`` against its corresponding key
        (:func:`dense_pairs`), all locations flattened into one batch as lightly's example does."""
        k_matched = dense_pairs(q_features, k_features, k_dense)
        return self.dense_criterion(q_dense.flatten(end_dim=1).float(), k_matched.flatten(end_dim=1).float())

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        q_features, q_global, q_dense = split_encode(self.query, x0, self.bn_groups)
        k_features, k_global, k_dense = self.key(x1)
        self._check_dense_queue(q_features.shape[1])
        w = self.cfg.dense_weight
        return ((1 - w) * self.criterion(q_global.float(), k_global)
                + w * self.dense_loss(q_features, k_features, q_dense, k_dense))

    def checkpoint_state(self) -> dict[str, Any]:
        return {"memory_bank": BufferState(self.criterion.memory_bank, ["bank", "bank_ptr"]),
                "dense_memory_bank": BufferState(self.dense_criterion.memory_bank, ["bank", "bank_ptr"])}


register_method(StageInfo("densecl", "selfsup", GENERIC_SCRIPT, "configs/densecl.yaml", "runs/pretrain/densecl",
                          description="DenseCL (Wang et al. 2021): global + dense InfoNCE on MoCo v2",
                          schema=f"{__name__}:DenseCLConfig"),
                DenseCL, DenseCLConfig)
