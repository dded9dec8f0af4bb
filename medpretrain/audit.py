"""Synthetic-sample audit: realism, distribution distance and memorisation of generated images.

Parts used by ``scripts/audit_synthetic.py`` (each usable alone):

* :func:`load_fake_images` - a folder of images or a ``.npz`` as ``[N, C, H, W]`` in [0, 1], resized and
  converted to the real data's size and channels.
* :func:`extract_features` - pooled backbone features of an image tensor (:mod:`medpretrain.knn`'s).
* :func:`fid_kid` - FID and KID through torchmetrics with a custom feature module
  (:class:`PrecomputedFeatures`), so no Inception weights and no ``torch-fidelity`` are needed.
  Features are computed once and passed through, because the kNN metrics and the memorisation check
  reuse them; :class:`BackboneFeatures` wraps a backbone for callers who want torchmetrics to see images.
* :func:`prdc` - k-NN precision / recall (Kynkäänniemi et al. 2019) and density / coverage
  (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", ICML 2020).
* :func:`memorisation` - each fake's nearest training image in pixel and feature space; a fake is flagged
  when its distance falls below the ``quantile`` of the distances from real held-out images to the
  training images (the distance an unseen real image typically has).
* :func:`cross_fit_discriminator` - a (pretrained) backbone fine-tuned to tell real from fake with k-fold
  cross-fitting, so every image gets a realism score ``P(real)`` from a discriminator that never saw it.

Library code: no printing; errors are ``ValueError`` / ``FileNotFoundError`` naming what is wrong.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medpretrain.config import ConfigError
from medpretrain.data.errors import DataError
from medpretrain.data.transforms import resize, to_channels
from medpretrain.knn import extract_features  # the one feature pass (re-exported here)
from medpretrain.schedules import fused

# ------------------------------------------------------------------------------------------------
# Fake images
# ------------------------------------------------------------------------------------------------


def _npz_images(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        if key:
            if key not in keys:
                raise DataError(path, f"no array {key!r}; arrays: {keys}")
            return npz[key]
        if "images" in keys:
            return npz["images"]
        candidates = [k for k in keys if k.endswith("_images")]
        if len(candidates) == 1:
            return npz[candidates[0]]
        raise DataError(path, f"expected an array 'images' or exactly one '*_images' (arrays: {keys}); "
                              "choose one with fake_key=<name>")


def _to_unit_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """``[N, H, W]``, ``[N, H, W, C]`` (MedMNIST) or ``[N, C, H, W]`` uint8 / float -> float32 ``[N, C, H, W]`` in [0, 1]."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise DataError(source, f"expected images [N, H, W], [N, H, W, C] or [N, C, H, W] with C 1 or 3, "
                                f"got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if not np.isfinite(array).all() or lo < 0.0 or hi > 1.0:
            raise DataError(source, f"float images must lie in [0, 1] (got min {lo}, max {hi}); "
                                    "store uint8 0..255 as generative/sample.py does")
        return array.astype(np.float32)
    raise DataError(source, f"unsupported image dtype {array.dtype} (use uint8 or float in [0, 1])")


def load_fake_images(path: str | Path, size: tuple[int, int], channels: int, *, key: str = "") -> Tensor:
    """Generated images as float32 ``[N, channels, *size]`` in [0, 1].

    ``path``: a ``.npz`` (array ``key``, else ``images``, else the only ``*_images``: the layout of
    ``generative/sample.py`` and MedMNIST), a folder holding ``samples.npz``, or a folder of image files
    read by the ``folder:`` reader in unlabeled mode (8-bit / 255, RGB -> grey by luma). Images are
    resized (bilinear, antialiased) and converted to ``channels`` as the real data is.
    Raises ``FileNotFoundError`` or :class:`~medpretrain.data.errors.DataError` (a ``ValueError``) naming the path.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"fake images not found: {p}")
    if p.is_dir() and (p / "samples.npz").is_file():
        p = p / "samples.npz"
    if p.is_file():
        if p.suffix != ".npz":
            raise DataError(p, "fake images must be a .npz or a folder of images")
        arr = _to_unit_nchw(_npz_images(p, key), str(p))
        arr = np.stack([to_channels(im, channels) for im in arr]) if arr.shape[1] != channels else arr
        return torch.from_numpy(resize(arr, size).copy())
    from medpretrain.config import DataConfig
    from medpretrain.data import read_source

    source = read_source(DataConfig(dataset=f"folder:{p}", image_size=size[0], channels=channels))
    if size[0] != size[1]:
        raise DataError(p, f"real images are {size[0]}x{size[1]}; the folder reader resizes to squares only")
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in source.images]))


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


class BackboneFeatures(nn.Module):
    """A frozen backbone as a torchmetrics feature extractor (``feature=`` of FID / KID).

    Takes float images already normalised for the backbone; ``num_features`` tells torchmetrics the size.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval()
        self.num_features = int(getattr(backbone, "num_features"))  # noqa: B009 (contract attribute)

    def train(self, mode: bool = True) -> BackboneFeatures:
        return super().train(False)  # never leaves eval mode, like torchmetrics' NoTrainInceptionV3

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(1)


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": the inputs given to torchmetrics are already features ``[B, D]``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features [B, {self.num_features}], got {tuple(x.shape)}")
        return x


# ------------------------------------------------------------------------------------------------
# Distribution metrics
# ------------------------------------------------------------------------------------------------


def fid_kid(real: Tensor, fake: Tensor, *, kid_subsets: int = 50, kid_subset_size: int = 100,
            kid_degree: int = 3, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between feature sets ``[N, D]`` and ``[M, D]``.

    Computed by torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with
    :class:`PrecomputedFeatures` as the feature module, in float64. KID: unbiased MMD^2 with the cubic
    polynomial kernel ``(x.y / D + 1)^3`` on ``kid_subsets`` random subsets of ``min(kid_subset_size, N, M)``
    per side (drawn from torch's RNG forked and seeded with ``seed``, so the result is reproducible).
    Both depend on the sample sizes: compare only numbers computed with equal ``N`` and ``M``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid_kid needs [N, D] and [M, D] features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("fid_kid needs at least 2 samples per set")
    d = real.shape[1]
    real64, fake64 = real.double(), fake.double()
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(d), normalize=True)
    fid.update(real64, real=True)
    fid.update(fake64, real=False)
    subset = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "KID keeps all features in memory": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(d), subsets=kid_subsets, subset_size=subset,
                                      degree=kid_degree, normalize=True)
    kid.update(real64, real=True)
    kid.update(fake64, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": subset, "n_real": len(real), "n_fake": len(fake)}


def _kth_nn_radius(x: Tensor, k: int) -> Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def prdc(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of ``fake [M, D]`` against ``real [N, D]``.

    Balls: each real sample's radius is the distance to its ``k``-th nearest real neighbour (likewise for
    fakes). Precision: fraction of fakes inside some real ball; recall: fraction of reals inside some
    fake ball (Kynkäänniemi et al. 2019). Density: ``1/(kM) * sum_j #{real balls containing fake j}``
    (~1 when fakes follow the real distribution, unbounded above); coverage: fraction of real balls
    containing at least one fake (Naeem et al. 2020). Euclidean distance; points on a ball's surface
    count as inside.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"prdc needs [N, D] and [M, D] features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"prdc needs 1 <= k < min(N, M) = {min(len(real), len(fake))}, got k={k}")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    d = torch.cdist(real, fake)  # [N, M]
    inside_real = d <= r_real[:, None]  # fake j inside real ball i
    inside_fake = d <= r_fake[None, :]  # real i inside fake ball j
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float(inside_fake.any(dim=1).double().mean()),
        "density": float(inside_real.sum(dim=0).double().mean() / k),
        "coverage": float(inside_real.any(dim=1).double().mean()),
        "k": k,
    }


# ------------------------------------------------------------------------------------------------
# Memorisation
# ------------------------------------------------------------------------------------------------


def nearest_neighbours(query: Tensor, bank: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Euclidean distance to, and index of, the nearest ``bank`` row for each ``query`` row (flattened)."""
    q, b = query.flatten(1).double(), bank.flatten(1).double()
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"query and bank dimensions differ: {q.shape[1]} vs {b.shape[1]}")
    dist, idx = [], []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i : i + chunk], b)
        m = d.min(dim=1)
        dist.append(m.values)
        idx.append(m.indices)
    return torch.cat(dist).float(), torch.cat(idx)


@dataclass
class MemorisationSpace:
    """Nearest-training-image results in one space (``pixel``: RMS per pixel on [0, 1]; ``feature``:
    Euclidean between L2-normalised features)."""

    distance: Tensor
    """``[M]`` each fake's distance to its nearest training image."""
    index: Tensor
    """``[M]`` that training image's index."""
    heldout_distance: Tensor
    """``[H]`` each real held-out image's distance to its nearest training image."""
    threshold: float
    flagged: Tensor
    """``[M]`` bool: ``distance <= threshold``."""
    heldout_flag_rate: float
    """Fraction of the calibration images at or below the threshold (about ``quantile`` by construction)."""


@dataclass
class MemorisationResult:
    quantile: float
    rule: str
    """``both``: flagged when below the threshold in every space; ``any``: in at least one."""
    heldout_duplicates: Tensor
    """``[H]`` bool: held-out images that are exact pixel copies of a training image (a property of the
    dataset, not of the generator); they are left out of the calibration."""
    spaces: dict[str, MemorisationSpace] = field(default_factory=dict)

    @property
    def flagged(self) -> Tensor:
        """``[M]`` bool: flagged under :attr:`rule`."""
        stacked = torch.stack([s.flagged for s in self.spaces.values()])
        return stacked.all(dim=0) if self.rule == "both" else stacked.any(dim=0)


DUPLICATE_TOL = 1e-6
"""Pixel RMS distance at or below which a held-out image counts as an exact copy of a training image."""


def _space(fake: Tensor, train: Tensor, heldout: Tensor, quantile: float, keep: Tensor | None = None) -> MemorisationSpace:
    dist, idx = nearest_neighbours(fake, train)
    held, _ = nearest_neighbours(heldout, train)
    calib = held if keep is None else held[keep]
    threshold = float(torch.quantile(calib.double(), quantile))
    return MemorisationSpace(dist, idx, held, threshold, dist <= threshold, float((calib <= threshold).float().mean()))


def memorisation(fake_pixels: Tensor, train_pixels: Tensor, heldout_pixels: Tensor,
                 fake_features: Tensor | None = None, train_features: Tensor | None = None,
                 heldout_features: Tensor | None = None, *, quantile: float = 0.01,
                 rule: str = "both") -> MemorisationResult:
    """Flag fakes closer to a training image than real held-out images usually are.

    Pixel space: images in [0, 1], distance divided by ``sqrt(pixels)`` (RMS difference). Feature space
    (when the three feature tensors are given): Euclidean between L2-normalised features. Threshold per
    space: the ``quantile`` of the held-out images' nearest-training distances, leaving out held-out images
    that are exact copies of a training image (datasets contain such duplicates: 8 of PneumoniaMNIST's 524
    validation images are in this copy's training split, enough to pull a 1% threshold to 0). ``<=`` so
    exact copies are always flagged. ``rule``: ``both`` (default) flags a fake only when it is that close
    in pixel and in feature space; ``any`` in either. Pixel distance alone over-flags smooth images (heavily
    blurred real images sit closer to some training image than 1% of held-out images do), a near-copy is
    close in both. Raises ``ValueError`` for a bad quantile or rule, or too few calibration images.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"memorisation quantile must be in [0, 1), got {quantile}")
    if rule not in ("both", "any"):
        raise ValueError(f"memorisation rule must be 'both' or 'any', got {rule!r}")
    scale = math.sqrt(fake_pixels[0].numel())
    fp, tp, hp = (x.flatten(1).float() / scale for x in (fake_pixels, train_pixels, heldout_pixels))
    held_pixel, _ = nearest_neighbours(hp, tp)
    duplicates = held_pixel <= DUPLICATE_TOL
    keep = ~duplicates
    if int(keep.sum()) < 2:
        raise ConfigError(f"memorisation needs at least 2 held-out images that are not copies of training images, "
                         f"got {int(keep.sum())} of {len(hp)}")
    result = MemorisationResult(quantile, rule, duplicates)
    result.spaces["pixel"] = _space(fp, tp, hp, quantile, keep)
    feats = (fake_features, train_features, heldout_features)
    if all(f is not None for f in feats):
        f, t, h = (F.normalize(x.float(), dim=1) for x in feats)  # type: ignore[union-attr]
        result.spaces["feature"] = _space(f, t, h, quantile, keep)
    elif any(f is not None for f in feats):
        raise ValueError("memorisation: give all three feature tensors or none")
    return result


# ------------------------------------------------------------------------------------------------
# Discriminator with cross-fitting
# ------------------------------------------------------------------------------------------------


@dataclass
class DiscriminatorResult:
    """Out-of-fold scores ``P(real)`` for every real and fake image, and the AUCs (reals positive)."""

    real_scores: Tensor
    fake_scores: Tensor
    real_fold: Tensor
    fake_fold: Tensor
    fold_auc: list[float]
    """AUC of each fold's discriminator on its own held-out part."""
    pooled_auc: float
    """AUC of all out-of-fold scores pooled. Lower than ``auc`` when the folds' discriminators are
    calibrated differently (their scores are not on one scale), so not the headline number."""
    null_sd: float
    """Standard deviation of an uninformative score's AUC with these class sizes (Hanley-McNeil under H0:
    ``sqrt((n1 + n2 + 1) / (12 n1 n2))``): how far from 0.5 chance alone moves it."""
    final_loss: list[float]

    @property
    def auc(self) -> float:
        """The headline: mean of the per-fold held-out AUCs."""
        return float(np.mean(self.fold_auc))

    def fake_realism_rank(self) -> Tensor:
        """``[M]`` per fake: fraction of real images of its fold that its own discriminator scored lower
        (ties count half). Comparable across folds, unlike ``P(real)``; ~0.5 for a fake that looks as real
        as a typical real image, 0 for one scored below every real image."""
        out = torch.empty(len(self.fake_scores))
        for i in self.fake_fold.unique().tolist():
            reals = self.real_scores[self.real_fold == i]
            fakes = self.fake_scores[self.fake_fold == i]
            below = (reals[None, :] < fakes[:, None]).float().mean(1)
            ties = (reals[None, :] == fakes[:, None]).float().mean(1)
            out[self.fake_fold == i] = below + 0.5 * ties
        return out

    def auc_ci(self, n_boot: int = 200, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of :attr:`auc`, resampling reals and fakes within each fold."""
        gen = torch.Generator().manual_seed(seed)
        folds = self.fake_fold.unique().tolist()
        parts = [(self.real_scores[self.real_fold == i], self.fake_scores[self.fake_fold == i]) for i in folds]
        means = []
        for _ in range(n_boot):
            aucs = []
            for r, f in parts:
                rb = r[torch.randint(0, len(r), (len(r),), generator=gen)]
                fb = f[torch.randint(0, len(f), (len(f),), generator=gen)]
                aucs.append(binary_auc(rb, fb))
            means.append(float(np.mean(aucs)))
        lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        return float(lo), float(hi)


def binary_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """ROC AUC with ``pos_scores`` as positives (torchmetrics)."""
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.cat([pos_scores, neg_scores]).float()
    target = torch.cat([torch.ones(len(pos_scores)), torch.zeros(len(neg_scores))]).long()
    return float(binary_auroc(scores, target))


def _folds(n: int, k: int, gen: torch.Generator) -> Tensor:
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=gen)] = torch.arange(n) % k
    return fold


def train_discriminator(backbone: nn.Module, real: Tensor, fake: Tensor, *, epochs: int, batch_size: int,
                        lr: float, regime: str = "full", backbone_lr_mult: float = 1.0,
                        weight_decay: float = 0.0, pretrained: bool = True, seed: int = 0,
                        device: torch.device | str = "cpu") -> tuple[nn.Module, float]:
    """Fine-tune ``backbone`` + a linear head (one logit, real = 1) with BCE, then re-estimate BatchNorm
    statistics (:func:`recalibrate_batchnorm`); returns the model (eval mode) and the last epoch's mean loss. ``regime`` / ``backbone_lr_mult`` as in
    :func:`medpretrain.regimes.apply_regime`; AdamW."""
    from medpretrain.regimes import Classifier, apply_regime

    model = Classifier(backbone, 1).to(device)
    groups, _ = apply_regime(model, regime, lr=lr, backbone_lr_mult=backbone_lr_mult,
                             weight_decay=weight_decay, pretrained=pretrained)
    opt = torch.optim.AdamW(groups, fused=fused(groups))
    x = torch.cat([real, fake])
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
    gen = torch.Generator().manual_seed(seed)
    last = math.nan
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        losses = []
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            logits = model(x[idx].to(device)).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        last = float(np.mean(losses)) if losses else math.nan
    recalibrate_batchnorm(model, x, batch_size, device)
    return model.eval(), last


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Tensor, batch_size: int, device: torch.device | str = "cpu") -> None:
    """Re-estimate the running statistics of the BatchNorm layers that train, as exact averages over
    ``images`` with the final weights (SWA's ``update_bn``). A short fine-tuning leaves the exponential
    running averages lagging behind the weights, which made eval-mode scores of whole folds unreliable."""
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    for i in range(0, len(images), batch_size):
        if len(images[i : i + batch_size]) > 1:
            model(images[i : i + batch_size].to(device))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def predict_real(model: nn.Module, images: Tensor, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """``P(real)`` ``[N]`` from a discriminator with one logit."""
    model.eval()
    out = [torch.sigmoid(model(images[i : i + batch_size].to(device)).float().reshape(-1)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def cross_fit_discriminator(make_backbone: Callable[[], nn.Module], real: Tensor, fake: Tensor, *, folds: int = 3,
                            epochs: int = 2, batch_size: int = 64, lr: float = 1e-3, regime: str = "full",
                            backbone_lr_mult: float = 1.0, weight_decay: float = 0.0, pretrained: bool = True,
                            seed: int = 0, device: torch.device | str = "cpu",
                            on_fold: Callable[[int, dict[str, Any]], None] | None = None) -> DiscriminatorResult:
    """k-fold cross-fitted real-vs-fake discriminator on normalised images.

    Real and fake images are each split into ``folds`` parts at random (seeded); for fold ``i`` a fresh
    backbone from ``make_backbone()`` (e.g. a copy of the pretrained one) is fine-tuned on the other parts
    (:func:`train_discriminator`) and scores part ``i``. So every image's score comes from a
    discriminator that did not train on it. ``on_fold(i, info)`` is called after each fold (progress).
    """
    if folds < 2:
        raise ValueError(f"cross-fitting needs folds >= 2, got {folds}")
    if min(len(real), len(fake)) < folds:
        raise ConfigError(f"need at least {folds} real and fake images for {folds} folds, "
                         f"got {len(real)} and {len(fake)}")
    gen = torch.Generator().manual_seed(seed)
    real_fold, fake_fold = _folds(len(real), folds, gen), _folds(len(fake), folds, gen)
    real_scores, fake_scores = torch.empty(len(real)), torch.empty(len(fake))
    fold_auc, losses = [], []
    for i in range(folds):
        torch.manual_seed(seed + 1000 * (i + 1))  # the head's init
        model, loss = train_discriminator(
            make_backbone(), real[real_fold != i], fake[fake_fold != i], epochs=epochs, batch_size=batch_size,
            lr=lr, regime=regime, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay,
            pretrained=pretrained, seed=seed + i, device=device)
        real_scores[real_fold == i] = predict_real(model, real[real_fold == i], device=device)
        fake_scores[fake_fold == i] = predict_real(model, fake[fake_fold == i], device=device)
        fold_auc.append(binary_auc(real_scores[real_fold == i], fake_scores[fake_fold == i]))
        losses.append(loss)
        if on_fold is not None:
            on_fold(i, {"auc": fold_auc[-1], "train_loss": loss})
    n1, n2 = len(real), len(fake)
    return DiscriminatorResult(real_scores, fake_scores, real_fold, fake_fold, fold_auc,
                               binary_auc(real_scores, fake_scores),
                               math.sqrt((n1 + n2 + 1) / (12 * n1 * n2)), losses)


def copy_factory(backbone: nn.Module) -> Callable[[], nn.Module]:
    """``make_backbone`` for :func:`cross_fit_discriminator`: a fresh deep copy of ``backbone`` each call."""
    return lambda: copy.deepcopy(backbone)


__all__ = [
    "BackboneFeatures", "DiscriminatorResult", "MemorisationResult", "MemorisationSpace", "PrecomputedFeatures",
    "binary_auc", "copy_factory", "cross_fit_discriminator", "extract_features", "fid_kid", "load_fake_images",
    "memorisation", "nearest_neighbours", "predict_real", "prdc", "train_discriminator",
]
