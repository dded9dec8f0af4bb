"""BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733) as lightly's BYOL example wires it.

Online network: backbone -> ``BYOLProjectionHead`` -> ``BYOLPredictionHead``; target network: a momentum copy
of backbone and projection head (no predictor), moved by ``update_momentum`` under a cosine schedule from
``momentum`` to 1 (``cosine_schedule``, per optimizer step as lightly's benchmark does). The loss is the
symmetrised ``NegativeCosineSimilarity`` between each view's prediction and the other view's target
projection; no negatives, so nothing is gathered across processes (each process's BatchNorm sees its own
batch, as in the paper's per-device BN).

    accelerate launch pretrain/train.py method=byol train.epochs=5 byol.momentum=0.996
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.methods.base import (
    GENERIC_SCRIPT,
    MomentumMethod,
    momentum_copy,
    pretrain_config,
    register_method,
)
from medpretrain.methods.registry import StageInfo


@dataclass
class BYOLMethodConfig:
    hidden_dim: int = 1024
    """Hidden width of the projection and prediction MLPs (lightly's ResNet-18 example: 1024)."""
    output_dim: int = 256
    """Projection (and prediction) size (BYOL: 256)."""
    momentum: float = 0.99
    """Starting momentum of the target network, raised to 1 with a cosine schedule (BYOL: 0.996 for long
    runs; short runs need the faster-moving 0.99, as for MoCo)."""


BYOLConfig = pretrain_config("byol", BYOLMethodConfig, "BYOLConfig", __name__)


class BYOL(MomentumMethod):
    """Online backbone + projector + predictor, momentum target, negative cosine loss (lightly's example)."""

    title = "BYOL"
    momentum_pairs = (("backbone", "backbone_momentum"), ("projection_head", "projection_head_momentum"))

    def __init__(self, backbone: Backbone, cfg: BYOLMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.cfg = cfg
        self.projection_head = BYOLProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.prediction_head = BYOLPredictionHead(cfg.output_dim, cfg.hidden_dim, cfg.output_dim)
        self.backbone_momentum = momentum_copy(self.backbone)
        self.projection_head_momentum = momentum_copy(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    def predict(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).float()


    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        p0, p1 = self.predict(x0).float(), self.predict(x1).float()
        return 0.5 * (self.criterion(p0, self.target(x1)) + self.criterion(p1, self.target(x0)))


register_method(StageInfo("byol", "selfsup", GENERIC_SCRIPT, "configs/byol.yaml", "runs/pretrain/byol",
                          description="BYOL (Grill et al. 2020)", schema=f"{__name__}:BYOLConfig"),
                BYOL, BYOLConfig)
