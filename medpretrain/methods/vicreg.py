"""VICReg (Bardes et al. 2022, https://arxiv.org/abs/2105.04906) as lightly's VICReg example wires it.

backbone -> ``VICRegProjectionHead`` (an expander MLP) -> ``VICRegLoss``: invariance (MSE between the two
views' embeddings), variance (a hinge keeping every dimension's standard deviation above 1) and covariance
(off-diagonal covariance pushed to 0) terms; no negatives and no momentum network. With several processes
the variance and covariance terms use embeddings gathered across processes (``gather_distributed=True``).
Departure: lightly's benchmark optimises VICReg with LARS; here the shared SGD/AdamW options apply.

    accelerate launch pretrain/train.py method=vicreg train.epochs=5 vicreg.lambda_param=25
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead  # not re-exported by lightly.models.modules
from torch import Tensor

from medpretrain.backbones import Backbone
from medpretrain.methods.base import GENERIC_SCRIPT, Method, pretrain_config, register_method
from medpretrain.methods.registry import StageInfo


@dataclass
class VICRegMethodConfig:
    hidden_dim: int = 2048
    """Expander hidden width (lightly's ResNet-18 example: 2048; the paper uses 8192 for ResNet-50)."""
    output_dim: int = 2048
    num_layers: int = 2
    lambda_param: float = 25.0
    """Weight of the invariance term (VICReg: 25)."""
    mu_param: float = 25.0
    """Weight of the variance term (VICReg: 25)."""
    nu_param: float = 1.0
    """Weight of the covariance term (VICReg: 1)."""


VICRegConfig = pretrain_config("vicreg", VICRegMethodConfig, "VICRegConfig", __name__)


class VICReg(Method):
    """Backbone + expander + variance-invariance-covariance loss (lightly's example)."""

    title = "VICReg"

    def __init__(self, backbone: Backbone, cfg: VICRegMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.projection_head = VICRegProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.output_dim,
                                                    num_layers=cfg.num_layers)
        self.criterion = VICRegLoss(cfg.lambda_param, cfg.mu_param, cfg.nu_param, gather_distributed=True)

    def project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return self.criterion(self.project(x0).float(), self.project(x1).float())


register_method(StageInfo("vicreg", "selfsup", GENERIC_SCRIPT, "configs/vicreg.yaml", "runs/pretrain/vicreg",
                          description="VICReg (Bardes et al. 2022)", schema=f"{__name__}:VICRegConfig"),
                VICReg, VICRegConfig)
