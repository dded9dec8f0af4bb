"""Frozen read-outs of a backbone: the linear probe and the kNN read-out, on cached features.

Both regimes freeze the whole backbone (:mod:`medpretrain.regimes`); ``finetune/run.py`` hands them to
:func:`run_probe` for classification instead of its training loop:

1. the frozen BatchNorm statistics are re-estimated on the run's training images
   (:func:`medpretrain.regimes.reestimate_bn`, which says why: with its initial statistics a random
   network's BN layers are the identity, the conv stack is positively homogeneous and a head ranks images
   by intensity);
2. the features of train / val / test are computed once, backbone in eval mode, and kept in memory
   (:func:`cache_features`);
3. ``linear``: the features are standardised with the training mean and standard deviation
   (:class:`Standardiser`) and a logistic regression (binary; multinomial for several classes; one per
   label, one-vs-rest, for multi-label) is fitted to convergence by L-BFGS (scikit-learn) for each L2
   strength ``C`` in :data:`C_GRID`; the ``C`` with the best validation headline metric wins (ties: the
   smaller ``C``). The fitted model is folded back through the standardisation into the ``Classifier``'s
   linear head (:func:`fold_standardisation`), and every reported probability is that head's output, so the
   saved ``model.safetensors`` reproduces them (:func:`fit_linear_probe`);
   ``knn`` / ``knn:<k>``: the training features are the bank of a weighted cosine kNN vote
   (:func:`medpretrain.knn.knn_scores`, ``t`` = :data:`KNN_T`), scored with the vote shares as class
   probabilities; ``k`` in :data:`KNN_KS` is chosen on validation unless given (:func:`knn_readout`);
4. the test split is read once, with the chosen ``C`` or ``k``; the results go through the same writers as
   trained runs (``results.json`` from :func:`medpretrain.finetune.complete_result`, ``predictions.npz``,
   ``model.safetensors``; a kNN run adds ``knn_bank.safetensors``).

Multi-task runs (``tasks``) fit one read-out per task on the same cached features, each choosing its own ``C``
or ``k`` on its validation AUC (:func:`multitask_readout`).

A fit takes seconds (the feature pass dominates). Why not a few Adam steps on raw features: that head is
not fitted, and it inherits the feature scale, so its ranking follows image intensity (issue 14). With
several processes every process computes the same read-out and the main process writes it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medpretrain.config import ConfigError
from medpretrain.data.synthetic import real_images
from medpretrain.regimes import Regime, parse_regime, reestimate_bn

C_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-4, 3))
"""Inverse L2 strengths of the linear probe, chosen on validation: 1e-4 ... 1e2."""
KNN_KS: tuple[int, ...] = (20, 200)
"""Neighbour counts of ``regime=knn``, chosen on validation (``knn:<k>`` fixes one)."""
KNN_T = 0.07
"""Temperature of the kNN vote weights ``exp(sim / t)`` (InstDisc, as the pretraining monitor)."""
MAX_ITER = 2000
"""L-BFGS iteration cap; a fit that reaches it is recorded as not converged in ``regime_info.readout``."""
TOL = 1e-6
"""L-BFGS tolerance (scikit-learn's default is 1e-4: a probe should be fitted, not started)."""
ABSENT_LOGIT = -1e4
"""Logit of a class that has no training example (its probability is 0)."""

Evaluate = Callable[[np.ndarray, np.ndarray], dict[str, float]]
"""``(probabilities, labels) -> metrics`` (the task's own, :attr:`medpretrain.finetune.TaskParts.evaluate`)."""


# ------------------------------------------------------------------------------------------------
# Regimes and BatchNorm
# ------------------------------------------------------------------------------------------------


def check_regime(task: str, regime: str | Regime) -> Regime:
    """Parse ``regime`` and refuse ``knn`` for a task other than classification (before any work)."""
    reg = parse_regime(regime) if isinstance(regime, str) else regime
    if reg.kind == "knn" and task != "classification":
        raise ConfigError(f"regime={reg} is a classification read-out; task={task} has none "
                          "(use linear for a frozen encoder)")
    return reg


def is_readout(task: str, regime: Regime) -> bool:
    """True when :func:`run_probe` replaces the training loop: ``linear`` or ``knn`` on classification.

    (A segmentation ``linear`` run trains its decoder on the frozen encoder in the training loop.)"""
    return check_regime(task, regime).frozen_readout and task == "classification"


def reestimate_frozen_bn(model: nn.Module, dataset: Any, device: torch.device | str, *, batch_size: int = 256,
                         num_workers: int = 0, regime_info: Any = None) -> int:
    """:func:`~medpretrain.regimes.reestimate_bn` of ``model``'s frozen BatchNorm layers over ``dataset`` (the
    run's training images or patches, in order, ``batch_size`` at a time); returns the number of layers.

    Nothing happens when nothing is frozen (``full``, ``reinit:<k>``, ``freeze:0``). The pass runs under a
    forked torch RNG, so random crops and the loader's seed draw leave the training run's random stream as it
    was. ``model`` is moved to ``device``. Sets ``regime_info.bn_reestimated`` when given.
    """
    model.to(device)
    with torch.random.fork_rng(devices=[]):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        n = reestimate_bn(model, loader, device)
    if regime_info is not None:
        regime_info.bn_reestimated = n > 0
    return n


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Frozen features of one split: ``x`` ``[N, D]`` (float32, CPU), ``labels`` ``[N]`` (class indices) or
    ``[N, L]`` (multi-hot), ``index`` ``[N]`` (dataset indices)."""

    x: Tensor
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@torch.no_grad()
def cache_features(backbone: nn.Module, dataset: Any, device: torch.device | str, *, batch_size: int = 256,
                   num_workers: int = 0) -> Features:
    """Pooled features of every sample of ``dataset`` (``{"image", "label", "index"}`` items), backbone in eval
    mode (each module's mode restored afterwards: frozen parts stay in eval). Raises ``ValueError`` for an empty
    dataset."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    xs, ys, idx = [], [], []
    try:
        for batch in loader:
            xs.append(backbone(batch["image"].to(device)).float().flatten(1).cpu())
            ys.append(batch["label"].cpu())
            idx.append(batch["index"].cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    if not xs:
        raise ValueError("cache_features got an empty dataset")
    return Features(torch.cat(xs), torch.cat(ys).numpy(), torch.cat(idx).numpy())


@dataclass
class Standardiser:
    """Per-feature z-score with training statistics: ``(x - mean) / scale``.

    A feature that is (nearly) constant on the training set (``std <= 1e-6 * max std``, e.g. a dead ReLU
    channel) keeps scale 1, as scikit-learn's ``StandardScaler`` does for zero variance."""

    mean: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, x: Tensor) -> Standardiser:
        x64 = x.double()
        mean, std = x64.mean(0), x64.std(0, unbiased=False)
        floor = 1e-6 * max(float(std.max()), 1e-12)
        return cls(mean, torch.where(std > floor, std, torch.ones_like(std)))

    def __call__(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) / self.scale


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


@dataclass
class LinearHead:
    """``logits = x @ weight.T + bias`` on raw features: the ``Classifier``'s ``head`` (``weight [K, D]``,
    ``bias [K]``; binary tasks have two logits, the MedMNIST convention)."""

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return x.float() @ self.weight.float().T + self.bias.float()


def _check_classes(labels: np.ndarray, task: str) -> None:
    if task != "multilabel" and len(np.unique(labels)) < 2:
        raise ConfigError(f"a read-out needs two classes among the training labels; the {len(labels)} training "
                          f"images are all class {int(labels[0])} (raise data.label_fraction)")


def fit_logistic(z: Tensor, labels: np.ndarray, task: str, num_outputs: int, C: float, *,
                 max_iter: int = MAX_ITER, tol: float = TOL) -> tuple[Tensor, Tensor, int, bool]:
    """L2-regularised logistic regression on standardised features ``z`` ``[N, D]`` by L-BFGS (scikit-learn);
    returns the head ``(weight [K, D], bias [K])`` in ``z`` space (float64), the iterations and whether it
    converged.

    Binary: one logistic regression, written as two logits ``-s/2, +s/2`` (their softmax is the sigmoid of
    ``s``). Multi-class: multinomial; a class absent from ``labels`` gets weight 0 and bias
    :data:`ABSENT_LOGIT`. Multi-label: one logistic regression per label; a label that is always 0 (or 1)
    in training gets weight 0 and the logit of its clipped training rate. Raises ``ConfigError`` when a
    binary or multi-class training set holds one class only.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    zn = z.double().numpy()
    d = zn.shape[1]
    weight, bias = np.zeros((num_outputs, d)), np.zeros(num_outputs)
    iters, converged = 0, True

    def fit(y: np.ndarray) -> LogisticRegression:
        nonlocal iters, converged
        clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol)
        # One BLAS thread: the problem is small (N x D ~ 1000 x 512), and multi-threaded BLAS next to torch's
        # threads made each L-BFGS iteration ~60x slower on the 2-core CPU (measured: 2.3 s vs 0.04 s a fit).
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as converged=False instead
            clf.fit(zn, y)
        n = int(np.max(clf.n_iter_))
        iters, converged = max(iters, n), converged and n < max_iter
        return clf

    if task == "multilabel":
        for j in range(num_outputs):
            y = labels[:, j].astype(np.int64)
            if len(np.unique(y)) < 2:
                rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
                bias[j] = math.log(rate / (1 - rate))
                continue
            clf = fit(y)
            weight[j], bias[j] = clf.coef_[0], clf.intercept_[0]
    else:
        y = labels.reshape(-1).astype(np.int64)
        _check_classes(y, task)
        clf = fit(y)
        if task == "binary":
            weight[1], bias[1] = clf.coef_[0] / 2, clf.intercept_[0] / 2
            weight[0], bias[0] = -weight[1], -bias[1]
        elif len(clf.classes_) == 2:  # two classes of several present: sklearn fits one binary model
            bias[:] = ABSENT_LOGIT
            lo, hi = (int(c) for c in clf.classes_)
            weight[hi], bias[hi] = clf.coef_[0] / 2, clf.intercept_[0] / 2
            weight[lo], bias[lo] = -weight[hi], -bias[hi]
        else:
            bias[:] = ABSENT_LOGIT
            for row, c in enumerate(clf.classes_):
                weight[int(c)], bias[int(c)] = clf.coef_[row], clf.intercept_[row]
    return torch.from_numpy(weight), torch.from_numpy(bias), iters, converged


def fold_standardisation(weight: Tensor, bias: Tensor, std: Standardiser) -> LinearHead:
    """The head on raw features equal to ``(weight, bias)`` on standardised ones:
    ``W z + b = (W / scale) x + (b - (W / scale) mean)``."""
    w = weight.double() / std.scale
    return LinearHead(w.float(), (bias.double() - w @ std.mean).float())


def _probs(logits: Tensor, task: str) -> np.ndarray:
    from medpretrain.metrics import probabilities

    return probabilities(logits, task).numpy()


def _best(candidates: Sequence[dict[str, Any]], headline: str) -> int:
    """Index of the candidate with the best validation headline score (NaN counts as worst; ties: first)."""
    scores = [c[f"val_{headline}"] for c in candidates]
    keyed = [s if math.isfinite(s) else -math.inf for s in scores]
    return int(np.argmax(keyed))


@dataclass
class ProbeFit:
    """A fitted read-out: the chosen candidate, its validation metrics and every candidate's score."""

    choice: dict[str, Any]
    """``{"C": ...}`` or ``{"k": ...}``."""
    val_metrics: dict[str, float]
    val_probs: np.ndarray
    """Validation probabilities of the chosen candidate (the threshold is chosen on them)."""
    candidates: list[dict[str, Any]]
    """One row per candidate: the parameter, ``val_<headline>`` and (linear) ``iterations``, ``converged``."""
    head: LinearHead | None = None
    """``linear`` only: the fitted head on raw features."""
    train_loss: float = math.nan
    """``linear``: training cross-entropy of the chosen fit (BCE per label for multi-label)."""
    iterations: int = 0
    converged: bool = True
    fit_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def readout(self, kind: str) -> dict[str, Any]:
        """``regime_info.readout`` of the run."""
        out: dict[str, Any] = {"kind": kind, **self.choice, "selected_on": "validation", "candidates": self.candidates,
                               "fit_s": self.fit_s, **self.extra}
        if kind == "linear":
            out.update(solver="lbfgs (scikit-learn LogisticRegression)", iterations=self.iterations,
                       converged=self.converged, max_iter=MAX_ITER, tol=TOL, standardised=True)
        return out


def fit_linear_probe(train: Features, val: Features, task: str, num_outputs: int, evaluate: Evaluate, *,
                     headline: str = "auc", Cs: Sequence[float] = C_GRID, max_iter: int = MAX_ITER) -> ProbeFit:
    """Logistic regressions on standardised ``train`` features for each ``C`` in ``Cs``; the one with the best
    validation ``headline`` metric (ties: the earlier, i.e. smaller, ``C``), folded into a raw-feature head.

    Validation probabilities are those of the folded head (what the saved model computes)."""
    if not Cs:
        raise ValueError("fit_linear_probe needs at least one C")
    t0 = time.perf_counter()
    std = Standardiser.fit(train.x)
    z = std(train.x)
    candidates, heads = [], []
    for C in Cs:
        w, b, n_iter, ok = fit_logistic(z, train.labels, task, num_outputs, float(C), max_iter=max_iter)
        head = fold_standardisation(w, b, std)
        p = _probs(head.logits(val.x), task)
        m = evaluate(p, val.labels)
        candidates.append({"C": float(C), f"val_{headline}": m[headline], "iterations": n_iter, "converged": ok})
        heads.append((head, m, n_iter, ok, p))
    i = _best(candidates, headline)
    head, m, n_iter, ok, p = heads[i]
    from medpretrain.finetune import classification_loss

    y = torch.as_tensor(train.labels)
    loss = float(classification_loss(head.logits(train.x), y.float() if task == "multilabel" else y.long(), task))
    return ProbeFit({"C": float(Cs[i])}, m, p, candidates, head=head, train_loss=loss, iterations=n_iter,
                    converged=ok, fit_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# kNN read-out
# ------------------------------------------------------------------------------------------------


def knn_probabilities(bank: Features, query: Features, task: str, num_outputs: int, k: int,
                      t: float = KNN_T) -> np.ndarray:
    """Vote-share probabilities of ``query`` against the labelled ``bank`` (:func:`medpretrain.knn.knn_scores`):
    ``[Q]`` (binary, the positive class), ``[Q, C]`` (multi-class), ``[Q, L]`` (multi-label)."""
    from medpretrain.knn import knn_scores

    targets = torch.as_tensor(bank.labels)
    targets = targets.float() if task == "multilabel" else targets.reshape(-1).long()
    p = knn_scores(query.x, bank.x, targets, num_outputs, k=k, t=t).numpy()
    return p[:, 1] if task == "binary" else p


def knn_readout(train: Features, val: Features, task: str, num_outputs: int, evaluate: Evaluate, *,
                headline: str = "auc", ks: Sequence[int] = KNN_KS, t: float = KNN_T) -> ProbeFit:
    """kNN vote over the ``train`` bank for each ``k`` in ``ks`` (clipped to the bank size, duplicates dropped);
    the ``k`` with the best validation ``headline`` metric wins (ties: the smaller)."""
    if task != "multilabel":
        _check_classes(train.labels.reshape(-1), task)
    t0 = time.perf_counter()
    used = sorted({min(int(k), len(train)) for k in ks})
    candidates, metrics, probs = [], [], []
    for k in used:
        p = knn_probabilities(train, val, task, num_outputs, k, t)
        m = evaluate(p, val.labels)
        candidates.append({"k": k, f"val_{headline}": m[headline]})
        metrics.append(m)
        probs.append(p)
    i = _best(candidates, headline)
    return ProbeFit({"k": used[i]}, metrics[i], probs[i], candidates, fit_s=time.perf_counter() - t0,
                    extra={"t": t, "requested_k": sorted({int(k) for k in ks}), "bank": "train", "bank_size": len(train),
                           "similarity": "cosine"})


# ------------------------------------------------------------------------------------------------
# Multi-task read-outs
# ------------------------------------------------------------------------------------------------


def multitask_readout(mt: Any, model: nn.Module, feats: dict[str, Features], regime: Regime,
                      headline: str = "auc") -> tuple[ProbeFit, dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """One read-out per task of ``mt`` (:class:`medpretrain.multitask.MultiTask`) on the same cached features:
    ``linear``: :func:`fit_linear_probe` on the task's targets (its ``C`` chosen on its own validation
    ``headline``), folded into ``model.heads[name]``; ``knn``: :func:`knn_readout` (the heads zeroed).

    Returns the combined :class:`ProbeFit` (``choice``: the value per task; ``val_metrics``: the multi-task
    validation metrics; ``train_loss``: the weighted sum of the task losses, the multi-task objective; NaN for
    kNN), the validation and test prediction arrays (:meth:`~medpretrain.multitask.MultiTask.arrays`) and the
    optimiser steps (the largest L-BFGS iteration count; 0 for kNN)."""
    from medpretrain.metrics import classification_metrics

    fits: dict[str, ProbeFit] = {}
    val_probs, test_probs = {}, {}
    for t in mt.tasks:
        split = {s: Features(f.x, t.target(f.labels), f.index) for s, f in feats.items()}

        def evaluate(probs: np.ndarray, labels: np.ndarray, kind: str = t.kind) -> dict[str, float]:
            return classification_metrics(probs, labels, kind)  # selection: threshold-free AUC

        head = model.heads[t.name]  # type: ignore[index]
        assert isinstance(head, nn.Linear)
        if regime.kind == "linear":
            fit = fit_linear_probe(split["train"], split["val"], t.kind, t.num_outputs, evaluate, headline=headline)
            assert fit.head is not None
            with torch.no_grad():
                head.weight.copy_(fit.head.weight)
                head.bias.copy_(fit.head.bias)
            test_probs[t.name] = _probs(fit.head.logits(split["test"].x), t.kind)
        else:
            ks = KNN_KS if regime.k is None else (regime.k,)
            fit = knn_readout(split["train"], split["val"], t.kind, t.num_outputs, evaluate, headline=headline, ks=ks)
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
            test_probs[t.name] = knn_probabilities(split["train"], split["test"], t.kind, t.num_outputs,
                                                   fit.choice["k"])
        fits[t.name] = fit
        val_probs[t.name] = fit.val_probs
    val = mt.arrays(val_probs, feats["val"].labels, feats["val"].index)
    test = mt.arrays(test_probs, feats["test"].labels, feats["test"].index)
    param = "C" if regime.kind == "linear" else "k"
    loss = (sum(t.weight * fits[t.name].train_loss for t in mt.tasks) if regime.kind == "linear" else math.nan)
    fit = ProbeFit({param: {n: f.choice[param] for n, f in fits.items()}}, mt.evaluate(val), val["probs"], [],
                   train_loss=float(loss), iterations=max(f.iterations for f in fits.values()),
                   converged=all(f.converged for f in fits.values()), fit_s=sum(f.fit_s for f in fits.values()),
                   extra={"tasks": {n: f.readout(regime.kind) for n, f in fits.items()}})
    return fit, val, test, fit.iterations if regime.kind == "linear" else 0


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def run_probe(cfg: Any, stage: Any, parts: Any, enc: Any, regime: Regime, regime_info: Any, *,
              requested_hash: str, t_run: float) -> Any:
    """A ``linear`` or ``knn`` classification run of ``finetune/run.py``, start to finish (its ``train()``):
    BN re-estimation, cached features, the read-out chosen on validation, the test split once, and the same
    outputs as a trained run. Returns the :class:`~medpretrain.results.RunResult`.

    ``metrics.csv`` gets one row (epoch 1: the fitted read-out); ``results.json`` has one history row,
    ``best_epoch = epochs_run = 1``, ``optimizer_steps`` = the L-BFGS iterations of the chosen fit (0 for kNN),
    and ``regime_info.readout`` (:meth:`ProbeFit.readout`).
    """
    from medpretrain.checkpoint import save_state_dict
    from medpretrain.config import config_to_dict
    from medpretrain.finetune import Progress, complete_result
    from medpretrain.metrics import METRIC_LABELS

    accelerator, out = stage.accelerator, stage.run_dir
    device = accelerator.device
    model, task, headline = parts.model, parts.label_task, parts.headline
    mt = parts.multitask
    num_outputs = int(model.head.out_features) if mt is None else 0
    train_ds = parts.datasets["train"]
    if task != "multilabel":
        _check_classes(np.asarray(train_ds.labels).reshape(-1), task)
    stage.begin({})  # config.yaml, metrics.csv header, trackers; a read-out keeps no resume checkpoint
    accelerator.print(f"{cfg.init} / {regime} / {parts.budget} / seed {cfg.seed}: {parts.summary}, frozen "
                      f"read-out on cached features")
    t0 = time.perf_counter()
    bs, workers = cfg.optim.eval_batch_size, cfg.data.num_workers
    # BatchNorm statistics from the real training images only; the read-out is fitted on all of them
    # (data.synthetic's images included: medpretrain.data.synthetic).
    reestimate_frozen_bn(model, real_images(train_ds), device, batch_size=bs, num_workers=workers,
                         regime_info=regime_info)
    feats = {split: cache_features(model.backbone, parts.datasets[split], device, batch_size=bs,
                                   num_workers=workers) for split in ("train", "val", "test")}
    features_s = time.perf_counter() - t0

    def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:  # selection: threshold-free AUC
        return dict(parts.evaluate({"probs": probs, "labels": labels})[0])

    if mt is not None:
        fit, val, test, steps = multitask_readout(mt, model, feats, regime, headline)
    elif regime.kind == "linear":
        fit = fit_linear_probe(feats["train"], feats["val"], task, num_outputs, evaluate, headline=headline)
        assert fit.head is not None
        with torch.no_grad():
            model.head.weight.copy_(fit.head.weight)
            model.head.bias.copy_(fit.head.bias)
        test_probs = _probs(fit.head.logits(feats["test"].x), task)
        steps = fit.iterations
    else:
        ks = KNN_KS if regime.k is None else (regime.k,)
        fit = knn_readout(feats["train"], feats["val"], task, num_outputs, evaluate, headline=headline, ks=ks)
        with torch.no_grad():  # the head is not the read-out: zeros (uniform probabilities), said in the meta
            model.head.weight.zero_()
            model.head.bias.zero_()
        test_probs = knn_probabilities(feats["train"], feats["test"], task, num_outputs, fit.choice["k"])
        steps = 0
    regime_info.readout = {**fit.readout(regime.kind), "features_s": features_s}
    if regime.kind == "knn":
        regime_info.trainable_params, regime_info.backbone_lr, regime_info.head_lr = 0, 0.0, 0.0
    else:
        regime_info.backbone_lr = regime_info.head_lr = 0.0  # fitted by L-BFGS, no learning rate

    progress = Progress()
    row = {"epoch": 1, "train_loss": fit.train_loss,
           **{f"val_{c}": fit.val_metrics[c] for c in parts.val_columns}, "lr": 0.0,
           "epoch_s": features_s + fit.fit_s, "step": steps}
    progress.record(row, fit.val_metrics, fit.val_metrics[headline], 0)
    progress.best_epoch = 1  # the one read-out is the selected one, whatever its score
    header = stage.metrics.fieldnames
    stage.log({k: v for k, v in row.items() if k != "epoch" and (header is None or k in header)}, 1)

    # The operating point is chosen on validation for the chosen read-out; then the test split, once.
    if mt is None:
        val = {"probs": fit.val_probs, "labels": feats["val"].labels, "index": feats["val"].index}
        test = {"probs": test_probs, "labels": feats["test"].labels, "index": feats["test"].index}
    threshold, rule = parts.choose_threshold(val)
    val_m, _ = parts.evaluate(val, threshold)
    test_m, rows = parts.evaluate(test, threshold)
    fields = parts.test_fields(test, rows, threshold)
    result = complete_result(cfg, parts, enc, regime, regime_info, progress, test_m,
                             {**fields, "optimizer_steps": steps, "threshold": threshold, "threshold_rule": rule},
                             requested_hash=requested_hash, t_run=t_run, accelerator=accelerator, out=out,
                             val_metrics=val_m)
    if accelerator.is_main_process:
        from medpretrain.results import write_results

        readout_meta = ({"readout": "linear", "C": fit.choice["C"]} if regime.kind == "linear" else
                        {"readout": "knn", "knn_k": fit.choice["k"], "knn_t": KNN_T,
                         "knn_bank": "knn_bank.safetensors"})
        save_state_dict(out / "model.safetensors", model.state_dict(),
                        {"config": config_to_dict(cfg), "task": task, "arch": cfg.backbone.arch,
                         "stem": enc.stem, "in_channels": cfg.data.channels, "mean": cfg.data.mean,
                         "std": cfg.data.std, "best_epoch": 1, "init": cfg.init, **readout_meta,
                         **parts.model_meta})
        if regime.kind == "knn":
            save_state_dict(out / "knn_bank.safetensors",
                            {"features": feats["train"].x, "labels": torch.as_tensor(feats["train"].labels),
                             "index": torch.as_tensor(feats["train"].index)},
                            {"k": fit.choice["k"], "t": KNN_T, "similarity": "cosine", "task": task,
                             "num_outputs": num_outputs if mt is None else mt.outputs})
        parts.save_outputs(out, test, threshold)
        write_results(out, result)
    label = METRIC_LABELS[headline]
    ci = fields["ci"][headline]
    chosen = ", ".join(f"{k} {v:g}" if not isinstance(v, dict) else f"{k} " + "/".join(f"{x:g}" for x in v.values())
                       for k, v in fit.choice.items())
    accelerator.print(f"{regime.kind} read-out ({chosen}, chosen on validation {label} "
                      f"{fit.val_metrics[headline]:.4f}) in {features_s + fit.fit_s:.1f}s; test ({parts.cases}): "
                      + " ".join(f"{k} {v:.4f}" for k, v in test_m.items())
                      + f" | {label} 95% CI [{ci['low']:.4f}, {ci['high']:.4f}]")
    return result


__all__ = [
    "ABSENT_LOGIT", "C_GRID", "KNN_KS", "KNN_T", "MAX_ITER", "TOL", "Features", "LinearHead", "ProbeFit",
    "Standardiser", "cache_features", "check_regime", "fit_linear_probe", "fit_logistic", "fold_standardisation",
    "is_readout", "knn_probabilities", "knn_readout", "multitask_readout", "reestimate_frozen_bn", "run_probe",
]
