"""Transfer regimes: how a (pre-trained) backbone and a new head are trained downstream.

The regimes follow the medical transfer-learning studies the project reproduces:

* ``linear``: linear probe / feature extraction. The whole backbone is frozen *and kept in eval mode*,
  so BatchNorm running statistics do not move either; only the head trains (for classification a
  logistic regression fitted to convergence on cached features, :mod:`medpretrain.probe`).
* ``knn`` / ``knn:<k>``: the whole backbone frozen as for ``linear``, read out by a weighted cosine kNN vote
  over the training features (``knn``: ``k`` in 20 / 200 chosen on validation; ``knn:<k>``: that ``k``);
  classification only (:mod:`medpretrain.probe`).
* ``freeze:<k>``: the first ``k`` stages are frozen (weights and BN statistics), the rest trains.
* ``full``: everything trains; pre-trained backbone weights use ``lr * backbone_lr_mult``.
* ``reinit:<k>``: keep the first ``k`` stages, re-initialise the stages above them and train all
  (Raghu et al., "Transfusion", NeurIPS 2019: useful reuse sits in the lowest layers).

Stages are counted from the input: for ResNets ``[stem (conv1, bn1), layer1, layer2, layer3, layer4]``,
so ``freeze:1`` freezes the stem only and ``reinit:1`` keeps only the stem. A backbone may declare its
own stages with a ``stages`` attribute (a list of lists of top-level module names); otherwise the
per-architecture table :data:`STAGES` is used, and otherwise the top-level children that hold
parameters, in order.

Frozen BatchNorm statistics are re-estimated on the run's training images before a frozen regime
(``linear``, ``knn``, ``freeze:<k>`` with ``k > 0``): :func:`reestimate_bn`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from medpretrain.config import ConfigError

STAGES: dict[str, list[list[str]]] = {
    "resnet": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "densenet": [
        ["features.conv0", "features.norm0"],
        ["features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"],
        ["features.denseblock3", "features.transition3"],
        ["features.denseblock4", "features.norm5"],
    ],
}
"""Stages per architecture family (matched as a prefix of ``backbone.arch``); names are submodule paths."""


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Top-level module names of each stage, from the input upwards."""
    declared = getattr(backbone, "stages", None)
    if declared:
        return [list(s) if not isinstance(s, str) else [s] for s in declared]
    arch = str(getattr(backbone, "arch", ""))
    if arch.startswith("cbr"):  # Transfusion's CBR nets: one stage per conv-BN-ReLU block
        blocks = backbone.get_submodule("blocks")
        return [[f"blocks.{i}"] for i in range(len(list(blocks.children())))]
    for family, stages in STAGES.items():
        if arch.startswith(family):
            return [list(s) for s in stages]
    return [[name] for name, m in backbone.named_children() if any(True for _ in m.parameters())]


@dataclass(frozen=True)
class Regime:
    """A parsed regime string: ``kind`` in linear / knn / freeze / full / reinit; ``k``: stages for freeze and
    reinit, neighbours for knn (``None``: chosen on validation)."""

    kind: str
    k: int | None = None

    def __str__(self) -> str:
        return self.kind if self.k is None else f"{self.kind}:{self.k}"


    @property
    def frozen_readout(self) -> bool:
        """``linear`` or ``knn``: the whole backbone is frozen and only read out."""
        return self.kind in ("linear", "knn")


def parse_regime(text: str) -> Regime:
    """Parse ``linear``, ``knn``, ``knn:<k>`` (``k >= 1``), ``full``, ``freeze:<k>`` or ``reinit:<k>``;
    raise ``ValueError`` (a ``ConfigError``) otherwise."""
    m = re.fullmatch(r"(linear|full|knn)|(freeze|reinit|knn):(\d+)", text.strip())
    if not m or (m.group(2) == "knn" and int(m.group(3)) < 1):
        raise ConfigError(f"unknown regime {text!r}; expected linear, knn, knn:<k>, full, freeze:<k> or reinit:<k>")
    if m.group(1):
        return Regime(m.group(1))
    return Regime(m.group(2), int(m.group(3)))


class KeepsFrozenInEval(nn.Module):
    """A model with a ``backbone`` whose frozen submodules (``frozen``: names, set by :func:`apply_regime`) stay
    in eval mode whatever ``train()`` says."""

    backbone: nn.Module
    frozen: list[str]

    def train(self, mode: bool = True) -> KeepsFrozenInEval:
        super().train(mode)
        for name in self.frozen:
            # Frozen means frozen: BatchNorm running statistics and dropout stay as in eval.
            self.backbone.get_submodule(name).eval()
        return self


class Classifier(KeepsFrozenInEval):
    """Backbone + dropout + linear head. Frozen modules stay in eval mode whatever ``train()`` says.

    ``forward(x [B, C, H, W]) -> logits [B, num_outputs]``.
    """

    def __init__(self, backbone: nn.Module, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        num_features = int(getattr(backbone, "num_features"))  # noqa: B009 (contract attribute)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_outputs)
        self.frozen: list[str] = []
        """Names of backbone submodules that are frozen (kept in eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


class MultiTaskClassifier(KeepsFrozenInEval):
    """Backbone + dropout + one linear head per task (``heads[name]``, multi-task fine-tuning,
    :mod:`medpretrain.multitask`); the heads are built in the order of ``outputs``. Frozen modules stay in eval
    mode whatever ``train()`` says.

    ``forward(x [B, C, H, W]) -> {name: logits [B, outputs[name]]}``. Raises ``ValueError`` for no task, a size
    below 1 or a dropout outside [0, 1).
    """

    def __init__(self, backbone: nn.Module, outputs: Mapping[str, int], dropout: float = 0.0):
        super().__init__()
        if not outputs or any(n < 1 for n in outputs.values()):
            raise ValueError(f"outputs must name at least one task, each with >= 1 output, got {dict(outputs)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        num_features = int(getattr(backbone, "num_features"))  # noqa: B009 (contract attribute)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(num_features, n) for name, n in outputs.items()})
        self.frozen: list[str] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.dropout(self.backbone(x))
        return {name: head(z) for name, head in self.heads.items()}


@dataclass
class RegimeInfo:
    """What :func:`apply_regime` did, for results files."""

    regime: str
    stages: list[list[str]]
    frozen_stages: list[int] = field(default_factory=list)
    reinit_stages: list[int] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    backbone_lr: float = 0.0
    head_lr: float = 0.0
    bn_reestimated: bool = False
    """Frozen BatchNorm statistics were re-estimated on the training images (:func:`reestimate_bn`)."""
    readout: dict[str, Any] = field(default_factory=dict)
    """``linear`` / ``knn`` read-outs (:mod:`medpretrain.probe`): what was fitted and chosen (C or k, the
    validation score of every candidate, solver iterations)."""


def _reset(module: nn.Module, fresh: nn.Module | None) -> None:
    if fresh is not None:
        module.load_state_dict(fresh.state_dict())
        return
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()  # type: ignore[operator]
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def apply_regime(
    model: KeepsFrozenInEval,
    regime: str | Regime,
    *,
    lr: float,
    backbone_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
    pretrained: bool = True,
    fresh_backbone: nn.Module | None = None,
) -> tuple[list[dict[str, Any]], RegimeInfo]:
    """Freeze / re-initialise ``model.backbone`` per ``regime`` and return optimizer parameter groups.

    Learning rates: the head and re-initialised stages use ``lr``; kept pre-trained backbone weights
    use ``lr * backbone_lr_mult`` (the multiplier is ignored when ``pretrained`` is false: nothing is
    worth protecting in a randomly initialised backbone). Weight decay applies to weight matrices and
    kernels only, not to biases and normalisation parameters. ``fresh_backbone`` (same architecture)
    supplies the re-initialised weights so that ``reinit`` matches a scratch initialisation exactly;
    without it the modules' ``reset_parameters`` are used.

    Returns ``(param_groups, info)``; frozen parameters have ``requires_grad=False`` and are in no group.
    """
    reg = parse_regime(regime) if isinstance(regime, str) else regime
    backbone = model.backbone
    stages = backbone_stages(backbone)
    n = len(stages)
    if reg.kind in ("freeze", "reinit") and reg.k is not None and not 0 <= reg.k <= n:
        raise ConfigError(f"regime {reg}: k must be between 0 and {n} (stages: {stages})")
    frozen_idx = list(range(n)) if reg.frozen_readout else list(range(reg.k or 0)) if reg.kind == "freeze" else []
    reinit_idx = list(range(reg.k or 0, n)) if reg.kind == "reinit" else []

    frozen_names = [name for i in frozen_idx for name in stages[i]]
    if reg.frozen_readout:
        frozen_names = [name for name, _ in backbone.named_children()]
    for name in frozen_names:
        for p in backbone.get_submodule(name).parameters():
            p.requires_grad_(False)
    model.frozen = frozen_names
    for i in reinit_idx:
        for name in stages[i]:
            sub_fresh = fresh_backbone.get_submodule(name) if fresh_backbone is not None else None
            _reset(backbone.get_submodule(name), sub_fresh)
    model.train(model.training)  # put the frozen parts in eval mode now

    reinit_prefixes = tuple(f"backbone.{name}." for i in reinit_idx for name in stages[i])
    mult = backbone_lr_mult if pretrained else 1.0
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kept_backbone = pname.startswith("backbone.") and not pname.startswith(reinit_prefixes)
        group_lr = lr * mult if kept_backbone else lr
        wd = weight_decay if p.ndim > 1 else 0.0
        buckets.setdefault((group_lr, wd), []).append(p)
    groups = [{"params": ps, "lr": glr, "weight_decay": wd} for (glr, wd), ps in buckets.items()]
    info = RegimeInfo(
        regime=str(reg),
        stages=stages,
        frozen_stages=frozen_idx,
        reinit_stages=reinit_idx,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad),
        backbone_lr=lr * mult,
        head_lr=lr,
    )
    return groups, info


def _frozen_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers inside ``model.backbone``'s frozen submodules (``model.frozen``), each once."""
    seen: dict[int, nn.modules.batchnorm._BatchNorm] = {}
    for name in getattr(model, "frozen", []):
        for m in model.backbone.get_submodule(name).modules():  # type: ignore[operator, union-attr]
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                seen.setdefault(id(m), m)
    return list(seen.values())


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str) -> int:
    """Re-estimate the running statistics of the frozen BatchNorm layers of ``model.backbone`` on ``batches``
    (``{"image": [B, C, H, W]}``, the run's training images); returns how many layers were re-estimated.

    Why: a frozen BN layer in eval mode normalises with its stored statistics. Those of a random network are
    the initial mean 0 / variance 1, so every BN layer is the identity plus its affine (1, 0) and the conv
    stack is positively homogeneous (``f(2x) = 2 f(x)``): features scale with image intensity, and a head on
    them ranks images by brightness (the sub-chance linear probes of issue 14). A pre-trained network's
    statistics belong to its pretraining data, not to the downstream images. The remedy is the one of SWA's
    ``torch.optim.swa_utils.update_bn``: reset the statistics, set ``momentum=None`` (a cumulative average over
    the batches), run the images through the backbone with those layers in train mode and no gradients, then
    put them back in eval mode, where they stay (:class:`Classifier` keeps frozen parts in eval). Only the
    frozen layers' statistics change: the other modules are in eval mode during the pass and the weights never
    change. The layers upstream of a BN normalise with their batch statistics during the pass (as in
    ``update_bn``), so the result is exact for the first BN and close for the others.
    """
    layers = _frozen_batchnorms(model)
    if not layers:
        return 0
    try:
        recompute_batchnorm(model, layers, (batch["image"].to(device) for batch in batches),
                            model.backbone, name="reestimate_bn")  # type: ignore[arg-type]  # a Module is callable
    finally:
        for m in layers:  # Classifier / UNet keep frozen parts in eval mode; here too when no batch came
            m.eval()
    return len(layers)


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, layers: Sequence[nn.modules.batchnorm._BatchNorm],
                        images: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], Any],
                        name: str = "recompute_batchnorm") -> int:
    """The pass of ``torch.optim.swa_utils.update_bn`` for ``layers`` (BatchNorm layers inside ``module``):
    their statistics reset, ``momentum=None`` (a cumulative average over the batches), ``images`` through
    ``forward`` with ``module`` in eval mode except ``layers`` and no gradients, then momenta and ``module``'s
    mode restored. Batches of fewer than 2 images are skipped. Returns the number of images used; raises
    ``ValueError`` naming ``name`` (statistics left as they were) when no batch of at least 2 images came.
    Shared by :func:`reestimate_bn` and the DCGAN export (:func:`medpretrain.generative.dcgan.reestimate_batchnorm`)."""
    momenta = [m.momentum for m in layers]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]  # restored if no batch came
    was_training = module.training
    module.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for x in images:
            if len(x) < 2:  # a one-image batch has no batch variance (BatchNorm raises for it)
                continue
            forward(x)
            n += len(x)
    finally:
        for m, mom in zip(layers, momenta, strict=True):
            m.momentum = mom
        module.train(was_training)
    if n == 0:
        for m, state in zip(layers, saved, strict=True):
            m.load_state_dict(state)
        raise ValueError(f"{name} got no batch of at least two images (the statistics are left as they were)")
    return n
