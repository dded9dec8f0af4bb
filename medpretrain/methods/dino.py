"""DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294) with a ResNet backbone, as lightly's example wires it.

Student: backbone -> ``DINOProjectionHead``; teacher: a momentum copy of both (``update_momentum`` under a
cosine schedule from ``momentum`` to 1). ``DINOLoss`` is the cross-entropy between the teacher's centred,
sharpened softmax of one view and the student's softmax of the other; the centre is a moving average of the
teacher's outputs (kept in the loss module's buffer, checkpointed with the model) and the teacher temperature
warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over the first ``teacher_temp_warmup`` of
the run. The student head's last layer is frozen for the first ``freeze_last_layer_steps`` steps (DINO: one
epoch), as lightly's ``on_after_backward`` does.

Departures, for 28-128 px scans: two global views only (no multi-crop local views: DINO's "2x224" ablation);
schedules are in optimizer steps rather than epochs; the teacher head starts as an exact copy of the student's
(DINO's code does this; lightly's example builds it from a fresh initialisation).

    accelerate launch pretrain/train.py method=dino train.epochs=5 dino.teacher_temp=0.04
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
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
class DINOMethodConfig:
    hidden_dim: int = 512
    """Head MLP width (lightly's ResNet-18 example: 512; DINO: 2048)."""
    bottleneck_dim: int = 64
    """Bottleneck before the weight-normalised last layer (lightly's example: 64; DINO: 256)."""
    output_dim: int = 2048
    """Prototypes K (lightly's example: 2048; DINO: 65536 on ImageNet)."""
    batch_norm: bool = False
    """BatchNorm in the head MLP (DINO's ``use_bn_in_head``, off by default as in lightly's example)."""
    momentum: float = 0.99
    """Starting teacher momentum, raised to 1 with a cosine schedule (DINO: 0.996 for long runs)."""
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up (DINO: 0.04-0.07)."""
    teacher_temp_warmup: float = 0.3
    """Fraction of the run over which the teacher temperature rises (DINO: 30 of 100 epochs)."""
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0
    """Optimizer steps with the student head's last layer frozen (lightly's example: one epoch)."""


DINOConfig = pretrain_config("dino", DINOMethodConfig, "DINOConfig", __name__)


def _head(input_dim: int, cfg: DINOMethodConfig) -> DINOProjectionHead:
    return DINOProjectionHead(input_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.output_dim,
                              batch_norm=cfg.batch_norm, freeze_last_layer=cfg.freeze_last_layer_steps)


class DINO(MomentumMethod):
    """Student backbone + head, momentum teacher, centred and sharpened cross-entropy (lightly's example)."""

    title = "DINO"
    momentum_pairs = (("backbone", "teacher_backbone"), ("student_head", "teacher_head"))

    def __init__(self, backbone: Backbone, cfg: DINOMethodConfig, processes: int = 1):
        super().__init__(backbone)
        self.cfg = cfg
        self.student_head = _head(backbone.num_features, cfg)
        self.teacher_backbone = momentum_copy(self.backbone)
        # weight_norm's computed weight cannot be deep-copied: build the teacher head and copy the weights.
        self.teacher_head = _head(backbone.num_features, cfg)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(cfg.output_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
                                  teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                                  center_momentum=cfg.center_momentum)
        self.teacher_temp_now = cfg.warmup_teacher_temp

    def student(self, x: Tensor) -> Tensor:
        return self.student_head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1)).float()

    def before_step(self, step: int, total_steps: int) -> None:
        self.update_targets(step, total_steps)
        warmup = max(1, round(self.cfg.teacher_temp_warmup * total_steps))
        frac = min(1.0, step / warmup)
        self.teacher_temp_now = self.cfg.warmup_teacher_temp + frac * (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp)

    def on_after_backward(self, step: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=step)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        teacher_out = [self.teacher(x0), self.teacher(x1)]
        student_out = [self.student(x0).float(), self.student(x1).float()]
        return self.criterion(teacher_out, student_out, teacher_temp=self.teacher_temp_now)


register_method(StageInfo("dino", "selfsup", GENERIC_SCRIPT, "configs/dino.yaml", "runs/pretrain/dino",
                          description="DINO (Caron et al. 2021), ResNet backbone", schema=f"{__name__}:DINOConfig"),
                DINO, DINOConfig)
