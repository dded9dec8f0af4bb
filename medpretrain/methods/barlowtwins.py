"""Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230) as lightly's example wires it.

backbone -> ``BarlowTwinsProjectionHead`` -> ``BarlowTwinsLoss``: the cross-correlation matrix of the two
views' batch-normalised embeddings is pushed to the identity (diagonal to 1: invariance; off-diagonal to 0,
weighted by ``lambda_param``: redundancy reduction). No negatives, no momentum network. With several
processes the correlation is computed over the global batch (``gather_distributed=True``).
Departure: the paper optimises with LARS; here the shared SGD/AdamW options apply.

    accelerate launch pretrain/train.py method=barlowtwins train.epochs=5
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.methods.base import GENERIC_SCRIPT, Method, pretrain_config, register_method
from medpretrain.methods.registry import StageInfo


@dataclass
class BarlowTwinsMethodConfig:
    hidden_dim: int = 2048
    """Projector hidden width (lightly's ResNet-18 example: 2048; the paper uses 8192 for ResNet-50)."""
    output_dim: int = 2048
    lambda_param: float = 5e-3
    """Weight of the off-diagonal (redundancy reduction) term (Barlow Twins: 5e-3)."""


BarlowTwinsConfig = pretrain_config("barlowtwins", BarlowTwinsMethodConfig, "BarlowTwinsConfig", __name__)


class BarlowTwins(Method):
    """Backbone + projector + cross-correlation loss (lightly's example)."""

    title = "Barlow Twins"

    def __init__(self, backbone: Backbone, cfg: BarlowTwinsMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.projection_head = BarlowTwinsProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=cfg.lambda_param, gather_distributed=True)

    def project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return self.criterion(self.project(x0).float(), self.project(x1).float())


register_method(StageInfo("barlowtwins", "selfsup", GENERIC_SCRIPT, "configs/barlowtwins.yaml",
                          "runs/pretrain/barlowtwins", description="Barlow Twins (Zbontar et al. 2021)",
                          schema=f"{__name__}:BarlowTwinsConfig"),
                BarlowTwins, BarlowTwinsConfig)
