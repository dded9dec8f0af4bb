"""Weighted k-nearest-neighbour accuracy on frozen backbone features: the self-supervised monitor.

The rule of InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978) as used by DINO's and lightly's
kNN monitors: features are L2-normalised, the ``k`` most cosine-similar bank samples vote for their
label with weight ``exp(sim / t)``, the class with the largest summed weight wins. Differences from
``lightly.utils.benchmarking.knn_predict``: queries can be the bank itself with each sample's own
vote removed (leave-one-out), so a single labelled validation split is enough to monitor a run, and
ties are broken towards the lower class index deterministically.

:func:`knn_scores` turns the same votes into class probabilities (each class's share of the summed
weight), so a kNN read-out has an AUC (the ``knn`` regime of :mod:`medpretrain.probe`; multi-label banks
vote per label). :class:`KNNMonitor` scores a backbone during pretraining (:func:`knn_monitor` builds it
from the config): its call returns the accuracy, and :attr:`KNNMonitor.last` holds the numbers that make
the accuracy readable: balanced accuracy, AUC and the majority baseline (:func:`knn_report`).
:func:`extract_features` is the one feature pass of the library (the audit's feature metrics use it too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset


def _check_knn(query: Tensor, bank: Tensor, n_bank_labels: int, exclude_self: bool, k: int, t: float) -> None:
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"kNN needs [Q, D] queries and [N, D] bank, got {tuple(query.shape)} and {tuple(bank.shape)}")
    if n_bank_labels != bank.shape[0]:
        raise ValueError(f"kNN bank labels must be [N] = [{bank.shape[0]}], got {n_bank_labels} rows")
    if exclude_self and query.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self needs the queries to be the bank itself")
    if k < 1 or t <= 0:
        raise ValueError(f"kNN needs k >= 1 and t > 0, got k={k}, t={t}")


def _votes(query: Tensor, bank: Tensor, targets: Tensor, num_classes: int, k: int, t: float, exclude_self: bool,
           chunk: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Summed ``exp(sim / t)`` weight per class ``[Q, C]`` of the ``k`` most similar bank samples, and the
    summed weight of those neighbours ``[Q]``.

    ``targets``: class indices ``[N]`` (each neighbour votes for its class) or multi-hot ``[N, C]`` (each
    neighbour votes for each of its labels). ``dtype``: of the weights and sums."""
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    targets = targets.to(bank.device)
    out, totals = [], []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T  # [q, N]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        weight, idx = sim.topk(k, dim=1)
        w = (weight.to(dtype) / t).exp()
        if targets.ndim == 1:
            votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=dtype)
            votes.scatter_add_(1, targets.long()[idx], w)
        else:
            votes = (w.unsqueeze(-1) * targets.to(dtype)[idx]).sum(1)
        out.append(votes)
        totals.append(w.sum(1))
    return torch.cat(out), torch.cat(totals)


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
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"kNN bank labels must be [N] = [{bank.shape[0]}], got {tuple(bank_labels.shape)}")
    _check_knn(query, bank, bank_labels.shape[0], exclude_self, k, t)
    return _votes(query, bank, bank_labels, num_classes, k, t, exclude_self, chunk)[0].argmax(dim=1)


def knn_scores(
    query: Tensor,
    bank: Tensor,
    bank_targets: Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> Tensor:
    """Class probabilities ``[Q, C]`` of the weighted vote of :func:`knn_predict`: each class's share of the
    summed weight ``exp(sim / t)`` of the ``k`` nearest bank samples (rows sum to 1; argmax = :func:`knn_predict`).

    ``bank_targets``: class indices ``[N]``, or multi-hot labels ``[N, C]`` (multi-label: the weighted fraction
    of neighbours carrying each label; rows need not sum to 1). ``k`` is clipped to the bank size.
    Raises ``ValueError`` on shape mismatches or ``k < 1``.
    """
    if bank_targets.ndim not in (1, 2) or (bank_targets.ndim == 2 and bank_targets.shape[1] != num_classes):
        raise ValueError(f"kNN bank targets must be [N] or [N, {num_classes}], got {tuple(bank_targets.shape)}")
    _check_knn(query, bank, bank_targets.shape[0], exclude_self, k, t)
    if bank.shape[0] - (1 if exclude_self else 0) < 1:
        raise ValueError("kNN needs a bank of at least one sample besides the query")
    # Sums in float64: a neighbourhood of one class then scores exactly 1 (in float32 the two summation orders
    # give 1 +- 1e-7, and a score above 1 makes torchmetrics' AUC squash every score through a sigmoid).
    votes, total = _votes(query, bank, bank_targets, num_classes, k, t, exclude_self, chunk, torch.float64)
    return (votes / total.unsqueeze(1)).clamp_(0.0, 1.0).float()


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


def knn_report(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor | None = None,
    bank_labels: Tensor | None = None,
    num_classes: int | None = None,
    k: int = 20,
    t: float = 0.07,
) -> dict[str, float]:
    """What a kNN monitor needs to be read: ``accuracy`` (top-1 of :func:`knn_predict`), ``balanced_accuracy``
    (mean recall over the classes present among the queries; chance is ``1 / C``), ``auc`` (of the
    :func:`knn_scores` probabilities: binary, or macro one-vs-rest; NaN when a class is absent from the
    queries) and ``majority_baseline``: the accuracy of always answering the bank's most frequent class (on
    PneumoniaMNIST's validation split 0.742, which a plain accuracy of 0.9 must be read against).

    Without a bank: leave-one-out over the queries (as :func:`knn_accuracy`).
    """
    from medpretrain.metrics import classification_metrics

    loo = bank is None
    if loo:
        bank, bank_labels = query, query_labels
    assert bank is not None and bank_labels is not None
    ql, bl = query_labels.long().cpu(), bank_labels.long().cpu()
    if num_classes is None:
        num_classes = int(max(int(ql.max()), int(bl.max()))) + 1
    scores = knn_scores(query, bank, bl, num_classes, k=k, t=t, exclude_self=loo).cpu()
    pred = knn_predict(query, bank, bl, num_classes, k=k, t=t, exclude_self=loo).cpu()
    present = [c for c in range(num_classes) if bool((ql == c).any())]
    recall = [float((pred[ql == c] == c).float().mean()) for c in present]
    majority = int(torch.bincount(bl, minlength=num_classes).argmax())
    task = "binary" if num_classes == 2 else "multiclass"
    auc = classification_metrics(scores[:, 1] if task == "binary" else scores, ql, task)["auc"]
    return {"accuracy": float((pred == ql).float().mean()), "balanced_accuracy": float(np.mean(recall)),
            "auc": auc, "majority_baseline": float((ql == majority).float().mean())}


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
    """kNN read-out of a backbone on labelled data: leave-one-out within the validation split
    (``split="val"``), or the train split's labels as the bank and validation as queries (``"train"``).

    ``monitor(backbone, device)`` returns the accuracy (the ``knn_acc`` column of pretraining) and keeps the
    whole :func:`knn_report` of that call in :attr:`last` (``accuracy``, ``balanced_accuracy``, ``auc``,
    ``majority_baseline``): an accuracy alone hides that a majority vote scores 0.742 on PneumoniaMNIST's
    validation split and a random network 0.91. :data:`REPORT_COLUMNS` names them as ``metrics.csv`` columns.
    """

    REPORT_COLUMNS: tuple[str, ...] = ("knn_balanced_acc", "knn_auc", "knn_majority")
    """``metrics.csv`` columns of :meth:`columns` (beside ``knn_acc``)."""

    def __init__(self, data: DataConfig, split: str, k: int, t: float, batch_size: int = 256):
        if split not in ("val", "train"):
            raise ValueError(f"kNN split must be 'val' or 'train', got {split!r}")
        self.k, self.t = k, t
        val = build_dataset(data, "val")
        self.val = DataLoader(val, batch_size=batch_size)
        self.bank = DataLoader(build_dataset(data, "train"), batch_size=batch_size) if split == "train" else None
        self.num_classes = val.num_classes
        self.n = len(val)
        self.last: dict[str, float] = {}
        """:func:`knn_report` of the latest call (empty before the first)."""

    def report(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        """:func:`knn_report` of ``backbone`` (also kept in :attr:`last`)."""
        q, ql = extract_features(backbone, self.val, device)
        if self.bank is None:
            self.last = knn_report(q, ql, num_classes=self.num_classes, k=self.k, t=self.t)
        else:
            b, bl = extract_features(backbone, self.bank, device)
            self.last = knn_report(q, ql, b, bl, num_classes=self.num_classes, k=self.k, t=self.t)
        return self.last

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        return self.report(backbone, device)["accuracy"]

    def columns(self) -> dict[str, float]:
        """The latest call's extra numbers under :data:`REPORT_COLUMNS` names (empty before the first call)."""
        if not self.last:
            return {}
        return {"knn_balanced_acc": self.last["balanced_accuracy"], "knn_auc": self.last["auc"],
                "knn_majority": self.last["majority_baseline"]}
