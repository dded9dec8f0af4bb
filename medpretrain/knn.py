"""Weighted k-nearest-neighbour accuracy on frozen backbone features: the self-supervised monitor.

The rule of InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978) as used by DINO's and lightly's
kNN monitors: features are L2-normalised, the ``k`` most cosine-similar bank samples vote for their
label with weight ``exp(sim / t)``, the class with the largest summed weight wins. Differences from
``lightly.utils.benchmarking.knn_predict``: queries can be the bank itself with each sample's own
vote removed (leave-one-out), so a single labelled validation split is enough to monitor a run, and
ties are broken towards the lower class index deterministically.

:class:`KNNMonitor` scores a backbone during pretraining (:func:`knn_monitor` builds it from the config);
:func:`extract_features` is the one feature pass of the library (the audit's feature metrics use it too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset


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
    backbone: nn.Module,
    data: Tensor | Iterable[Mapping[str, Tensor]],
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Pooled features ``[N, D]`` (float32, CPU) and labels ``[N]`` of ``data``, the backbone in eval mode.

    ``data``: a loader of ``{"image", "label"}`` batches, or an image tensor ``[N, C, H, W]`` (normalised
    for the backbone) cut into ``batch_size`` batches. Labels are empty (``[0]``) when the data has none.
    The backbone is put in eval mode for the pass and restored to its previous mode afterwards.
    Raises ``ValueError`` for empty data.
    """
    if isinstance(data, Tensor):
        batches: Iterable[Mapping[str, Tensor]] = ({"image": data[i : i + batch_size]}
                                                   for i in range(0, len(data), batch_size))
    else:
        batches = data
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in batches:
            x = batch["image"].to(device, non_blocking=True)
            feats.append(backbone(x).float().flatten(1).cpu())
            if "label" in batch:
                labels.append(batch["label"].reshape(-1).cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features got no images")
    return torch.cat(feats), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def knn_monitor(data: DataConfig, split: str, k: int, t: float, every: int) -> KNNMonitor | None:
    """The kNN monitor of pretraining, or ``None`` when it is switched off (``every < 0``) or the data has no
    image labels to score (segmentation masks, unlabeled folders): pretraining itself needs no labels."""
    if every < 0:
        return None
    if build_dataset(data, "val").task not in ("binary", "multiclass"):
        return None
    return KNNMonitor(data, split, k, t)


class KNNMonitor:
    """kNN accuracy of a backbone on labelled data: leave-one-out within the validation split
    (``split="val"``), or the train split's labels as the bank and validation as queries (``"train"``)."""

    def __init__(self, data: DataConfig, split: str, k: int, t: float, batch_size: int = 256):
        if split not in ("val", "train"):
            raise ValueError(f"kNN split must be 'val' or 'train', got {split!r}")
        self.k, self.t = k, t
        val = build_dataset(data, "val")
        self.val = DataLoader(val, batch_size=batch_size)
        self.bank = DataLoader(build_dataset(data, "train"), batch_size=batch_size) if split == "train" else None
        self.num_classes = val.num_classes
        self.n = len(val)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        q, ql = extract_features(backbone, self.val, device)
        if self.bank is None:
            return knn_accuracy(q, ql, num_classes=self.num_classes, k=self.k, t=self.t)
        b, bl = extract_features(backbone, self.bank, device)
        return knn_accuracy(q, ql, b, bl, num_classes=self.num_classes, k=self.k, t=self.t)
