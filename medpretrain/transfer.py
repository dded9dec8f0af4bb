"""Where a transfer reuses its features (Raghu et al. 2019, "Transfusion"): per backbone stage, how far the
weights moved during fine-tuning and how similar the stage's representation stayed.

* :func:`weight_change`: ``||w_tuned - w_init|| / ||w_init||`` over the stage's parameters (BatchNorm running
  statistics are buffers, not parameters, and are left out: they change in train mode without learning);
* :func:`linear_cka`: linear centred kernel alignment (Kornblith et al. 2019) of two representations of the
  same examples: 1 for equal representations, invariant to rotations and isotropic scaling, near 0 for
  independent ones;
* :func:`stage_outputs` / :func:`reuse_analysis`: each stage's output on a fixed batch of images, through the
  network as fine-tuning started and as it ended.

Stages are those of :func:`medpretrain.regimes.backbone_stages` (the names ``freeze:<k>`` / ``reinit:<k>``
count), from the input upwards. Used by ``finetune/run.py`` (the ``transfer`` field of ``results.json``) and
plotted per init by :mod:`medpretrain.report`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from medpretrain.regimes import backbone_stages


def _stage_params(backbone: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Parameters of the submodules ``names`` (a stage), keyed by their full names."""
    out: dict[str, Tensor] = {}
    for name in names:
        for key, p in backbone.get_submodule(name).named_parameters():
            out[f"{name}.{key}"] = p
    return out


def weight_change(initial: Mapping[str, Tensor], backbone: nn.Module,
                  stages: Sequence[Sequence[str]] | None = None) -> list[float]:
    """Relative weight change of each stage: ``||w - w0|| / ||w0||`` over its parameters, with ``initial`` the
    backbone's ``named_parameters`` (or state dict) as fine-tuning started. A stage without parameters gives
    0; a stage whose initial weights are all zero gives ``inf`` if it moved."""
    stages = backbone_stages(backbone) if stages is None else stages
    out = []
    for names in stages:
        params = _stage_params(backbone, names)
        missing = [k for k in params if k not in initial]
        if missing:
            raise KeyError(f"initial weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        diff = sum(float((p.detach().float() - initial[k].float()).pow(2).sum()) for k, p in params.items())
        ref = sum(float(initial[k].float().pow(2).sum()) for k in params)
        out.append(0.0 if diff == 0 else (diff ** 0.5 / ref ** 0.5 if ref > 0 else float("inf")))
    return out


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of representations ``x [n, ...]`` and ``y [n, ...]`` of the same ``n`` examples (each flattened
    per example): ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` computed with ``n x n`` Gram matrices, so
    wide feature maps cost no more than narrow ones. Raises ``ValueError`` for fewer than 2 examples or
    different ``n``; a constant representation gives 0."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: both representations need the same examples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 examples")
    xs = x.reshape(x.shape[0], -1).double()
    ys = y.reshape(y.shape[0], -1).double()
    xs, ys = xs - xs.mean(0, keepdim=True), ys - ys.mean(0, keepdim=True)
    kx, ky = xs @ xs.T, ys @ ys.T
    hsic = (kx * ky).sum()
    norm = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    return float(hsic / norm) if norm > 0 else 0.0


@torch.no_grad()
def stage_outputs(backbone: nn.Module, images: Tensor, stages: Sequence[Sequence[str]] | None = None,
                  batch_size: int = 64) -> list[Tensor]:
    """Each stage's output (that of its last submodule) for ``images``, in eval mode, on the CPU; the module's
    train/eval mode is restored afterwards."""
    stages = backbone_stages(backbone) if stages is None else stages
    chunks: list[list[Tensor]] = [[] for _ in stages]
    hooks = []
    for i, names in enumerate(stages):
        def keep(_m: nn.Module, _inp: Any, out: Any, i: int = i) -> None:
            chunks[i].append((out[0] if isinstance(out, (tuple, list)) else out).detach().float().cpu())
        hooks.append(backbone.get_submodule(names[-1]).register_forward_hook(keep))
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            backbone(images[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return [torch.cat(c) for c in chunks]


def snapshot(backbone: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone`` as fine-tuning starts (for :func:`reuse_analysis`)."""
    frozen = copy.deepcopy(backbone).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def reuse_analysis(initial: nn.Module, tuned: nn.Module, images: Tensor) -> dict[str, Any]:
    """Per stage of ``tuned``: weight change from ``initial`` (:func:`snapshot` of the same backbone as training
    started) and linear CKA between the two networks' stage outputs on ``images`` (a fixed validation batch).
    Returns the JSON-ready ``transfer`` field of ``results.json``."""
    stages = backbone_stages(tuned)
    change = weight_change(dict(initial.named_parameters()), tuned, stages)
    before, after = stage_outputs(initial, images, stages), stage_outputs(tuned, images, stages)
    return {"stages": [".".join(s) if len(s) == 1 else "+".join(s) for s in stages],
            "weight_change": change, "cka": [linear_cka(a, b) for a, b in zip(before, after, strict=True)],
            "n_images": int(len(images)),
            "method": "relative L2 weight change per stage; linear CKA of stage outputs before vs after "
                      "fine-tuning on a fixed validation batch (Raghu et al. 2019)"}
