"""Weighted k-nearest-neighbour accuracy on frozen backbone features: the self-supervised monitor.

The rule of InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978) as used by DINO's and lightly's
kNN monitors: features are L2-normalised, the ``k`` most cosine-similar bank samples vote for their
label with weight ``exp(sim / t)``, the class with the largest summed weight wins. Differences from
``lightly.utils.benchmarking.knn_predict``: queries can be the bank itself with each sample's own
vote removed (leave-one-out), so a single labelled validation split is enough to monitor a run, and
ties are broken towards the lower class index deterministically.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class ``[Q]`` for each query ``[Q, D]`` from a labelled bank ``[N, D]`` / ``[N]``.

    ``exclude_self``: the queries are the bank (same order) and a sample may not vote for itself.
    Raises ``ValueError`` on shape mismatches or ``k < 1``.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"kNN needs [Q, D] queries and [N, D] bank, got {tuple(query.shape)} and {tuple(bank.shape)}")
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"kNN bank labels must be [N] = [{bank.shape[0]}], got {tuple(bank_labels.shape)}")
    if exclude_self and query.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self needs the queries to be the bank itself")
    if k < 1 or t <= 0:
        raise ValueError(f"kNN needs k >= 1 and t > 0, got k={k}, t={t}")
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.long().to(bank.device)
    preds = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T  # [q, N]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        weight, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[idx], (weight / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor | None = None,
    bank_labels: Tensor | None = None,
    num_classes: int | None = None,
    k: int = 20,
    t: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict`. Without a bank: leave-one-out over the queries."""
    loo = bank is None
    if loo:
        bank, bank_labels = query, query_labels
    assert bank is not None and bank_labels is not None
    if num_classes is None:
        num_classes = int(max(int(query_labels.max()), int(bank_labels.max()))) + 1
    pred = knn_predict(query, bank, bank_labels, num_classes, k=k, t=t, exclude_self=loo)
    return float((pred.cpu() == query_labels.long().cpu()).float().mean())


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Features ``[N, D]`` and labels ``[N]`` of a labelled loader (``{"image", "label"}`` batches).

    The backbone is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in batches:
            x = batch["image"].to(device, non_blocking=True)
            feats.append(backbone(x).float().flatten(1).cpu())
            labels.append(batch["label"].reshape(-1).cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features got an empty loader")
    return torch.cat(feats), torch.cat(labels)
