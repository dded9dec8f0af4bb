"""SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709) as lightly's example wires it.

backbone -> ``SimCLRProjectionHead`` -> ``NTXentLoss``. Both views go through one forward, so BatchNorm
statistics are computed over the two views together, as SimCLR does. With several processes the
negatives are gathered across processes *with* gradients (``NTXentLoss(gather_distributed=True)``,
lightly's ``GatherLayer``); ``accelerator.gather`` carries no gradient and would silently train on local
negatives' gradients only.

    accelerate launch pretrain/simclr.py train.epochs=5 simclr.temperature=0.2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.methods.base import Method, pretrain_config, register_method
from medpretrain.methods.registry import StageInfo


@dataclass
class SimCLRMethodConfig:
    hidden_dim: int = 512
    """Projection head hidden width (lightly's examples use the backbone width for ResNet-18)."""
    output_dim: int = 128
    temperature: float = 0.5
    """NT-Xent temperature (SimCLR: 0.5 for batch sizes around 128-512)."""


SimCLRConfig = pretrain_config("simclr", SimCLRMethodConfig, "SimCLRConfig", __name__)


class SimCLR(Method):
    """Backbone + projection head + NT-Xent: lightly's SimCLR example, with a contract backbone."""

    title = "SimCLR"

    def __init__(self, backbone: Backbone, cfg: SimCLRMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.projection_head = SimCLRProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)

    def project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        z0, z1 = self.project(torch.cat([x0, x1])).float().chunk(2)  # one forward: BN over both views
        return self.criterion(z0, z1)


register_method(StageInfo("simclr", "selfsup", "pretrain/simclr.py", "configs/simclr.yaml", "runs/pretrain/simclr",
                          description="SimCLR (Chen et al. 2020)", schema=f"{__name__}:SimCLRConfig"),
                SimCLR, SimCLRConfig)
