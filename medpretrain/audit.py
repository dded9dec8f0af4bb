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
* :func:`fixed_budget_discriminator` - the score that still orders generators once that AUC is 1.000: the
  held-out cross-entropy of a fixed, tiny real-vs-fake discriminator (see "Fixed-budget discriminator").
* :func:`load_fake_labels` / :func:`per_class_metrics` - FID / KID / PRDC per class when the fakes carry
  ``labels`` (class-conditional samples), fakes of class c against reals of class c.
* :func:`class_grid` - per class a row of real images above a row of fakes, for one PNG.
* :func:`rank_audits` - generators ordered by :data:`RANKING_RULE`.

Fixed-budget discriminator
--------------------------
A ranking AUC stops moving once every fake scores below every real, which a fine-tuned deep network reaches
for every generator we have. The fixed-budget score asks instead *how confidently* a discriminator of fixed
capacity, trained with a fixed budget, tells them apart: on the frozen in-domain features (the audit
backbone's), ``n`` reals and ``n`` fakes (a seeded draw) are split into ``folds`` balanced folds; for each
fold an MLP ``D -> hidden -> 1`` (ReLU; seeded init) is trained on the other folds by full-batch gradient
descent for exactly ``steps`` steps of size ``lr / D``, and its binary cross-entropy on the held-out fold
(reals and fakes weighted equally, in nats) is recorded. The score is the mean over folds; ``ln 2 = 0.693``
is chance, higher is closer to real.

Why this definition. The cross-entropy is a proper scoring rule: it keeps falling as the two sets separate
further, long after every pair is ranked right (AUC 1), and the fixed budget bounds how large the logits can
grow, so two perfectly separable generators still get different losses. ``ln 2 - loss`` estimates (from
below, within this function class) the Jensen-Shannon divergence of the two feature distributions, the
quantity the optimal GAN discriminator measures (Goodfellow et al. 2014). A hidden layer rather than a
linear probe, because fakes that match the real feature mean but not its spread (noise, blur, mode collapse)
are invisible to a linear one. Plain gradient descent rather than Adam: Adam rescales every gradient to a
full step, so it fits sampling noise even between two samples of one distribution (held-out losses of 0.9
to 3.4 nats for real vs real in our checks); gradient descent moves in proportion to the real-fake
difference, so real vs real stays near ``ln 2`` and the loss falls steadily as fakes move away. Inputs are
centred on the training folds' pooled (real and fake) mean and divided by their overall standard deviation
(one scalar), so they stay of order one whatever the fakes and a fixed step size cannot diverge; the step
is divided by ``D`` because its effect on the hidden pre-activations grows with the squared input norm
(about ``D``), which makes the budget the same in a 64- and a 512-dimensional feature space.

The score depends on ``n`` and the settings: compare audits with equal ``n`` (``n_per_side``) and settings
only; the real-vs-real baseline (two disjoint real sets) gives the value a perfect generator would get.

Library code: no printing; errors are ``ValueError`` / ``FileNotFoundError`` naming what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
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


def _resolve_fake(path: str | Path) -> Path:
    """The ``.npz`` or image folder named by ``path`` (a folder holding ``samples.npz`` means that file)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"fake images not found: {p}")
    if p.is_dir() and (p / "samples.npz").is_file():
        p = p / "samples.npz"
    return p


def load_fake_images(path: str | Path, size: tuple[int, int], channels: int, *, key: str = "") -> Tensor:
    """Generated images as float32 ``[N, channels, *size]`` in [0, 1].

    ``path``: a ``.npz`` (array ``key``, else ``images``, else the only ``*_images``: the layout of
    ``generative/sample.py`` and MedMNIST), a folder holding ``samples.npz``, or a folder of image files
    read by the ``folder:`` reader in unlabeled mode (8-bit / 255, RGB -> grey by luma). Images are
    resized (bilinear, antialiased) and converted to ``channels`` as the real data is.
    Raises ``FileNotFoundError`` or :class:`~medpretrain.data.errors.DataError` (a ``ValueError``) naming the path.
    """
    p = _resolve_fake(path)
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


def load_fake_labels(path: str | Path, n_images: int, class_names: list[str] | None) -> np.ndarray | None:
    """The fakes' class labels, int64 ``[N]``, or ``None`` when the fakes carry none (a folder of images, or
    a ``.npz`` without a ``labels`` array: ``generative/sample.py`` writes ``labels`` and ``class_names`` for
    class-conditional samples).

    ``class_names``: the real data's classes (``None`` when the real data has no single-label classes).
    Raises :class:`~medpretrain.data.errors.DataError` naming the file when the labels do not fit the real
    classes: not integers ``[n_images]``, out of ``range(len(class_names))``, ``class_names`` stored in the
    file that differ from the real ones, or labelled fakes against unlabelled real data.
    """
    p = _resolve_fake(path)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as npz:
        if "labels" not in npz:
            return None
        labels = npz["labels"]
        names = [str(v) for v in npz["class_names"].reshape(-1)] if "class_names" in npz else None
    if class_names is None:
        raise DataError(p, "the fakes carry labels but the real data has no single-label classes to match them "
                           "against; audit against labelled real data or drop the 'labels' array")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n_images,):
        raise DataError(p, f"'labels' must be integers [{n_images}] (one per image), got {labels.dtype} "
                           f"{list(labels.shape)}")
    if names is not None and names != list(class_names):
        raise DataError(p, f"class_names {names} do not match the real data's classes {list(class_names)}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(p, f"labels {int(labels.min())}..{int(labels.max())} lie outside the real data's "
                           f"{len(class_names)} classes {list(class_names)}")
    return labels.astype(np.int64)


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


def distribution_metrics(real: Tensor, fake: Tensor, *, k: int = 5, kid_subsets: int = 50,
                         kid_subset_size: int = 100, seed: int = 0) -> dict[str, float]:
    """:func:`fid_kid` and :func:`prdc` of one pair of feature sets, in one mapping."""
    return {**fid_kid(real, fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed),
            **prdc(real, fake, k=k)}


def per_class_metrics(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor,
                      class_names: list[str], *, n: int | dict[int, int], k: int = 5, kid_subsets: int = 50,
                      kid_subset_size: int = 100, seed: int = 0) -> dict[str, dict[str, Any]]:
    """FID / KID / precision / recall / density / coverage per class, fakes of class c against reals of class c.

    ``real [N, D]`` / ``fake [M, D]`` features with int labels ``[N]`` / ``[M]`` in ``range(len(class_names))``.
    Per class: ``m = min(n, reals_c // 2, fakes_c)`` (``n``: one cap, or a cap per class index) fakes against ``m`` reals (A), beside ``m`` other reals
    (B) against A, the real-vs-real baseline, as for the overall numbers; ``k = min(k, m - 1)``. Reals are
    drawn from one seeded generator and fakes from another, so the real sides are the same for every fake
    set audited with the same ``seed``. A class with ``m < 2`` gets ``skipped`` (the reason) instead of
    numbers. Returns ``{class name: {"label", "n_real", "n_fake", "n_per_side", "k", "fake", "real_baseline"}}``.
    """
    if len(real_labels) != len(real) or len(fake_labels) != len(fake):
        raise ValueError(f"per_class_metrics: {len(real)} reals with {len(real_labels)} labels, "
                         f"{len(fake)} fakes with {len(fake_labels)} labels")
    gen_real, gen_fake = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        r, f = real[real_labels == c], fake[fake_labels == c]
        perm_r = torch.randperm(len(r), generator=gen_real)
        perm_f = torch.randperm(len(f), generator=gen_fake)
        m = min(n.get(c, 0) if isinstance(n, dict) else n, len(r) // 2, len(f))
        entry: dict[str, Any] = {"label": c, "n_real": len(r), "n_fake": len(f), "n_per_side": m}
        if m < 2:
            entry["skipped"] = (f"{len(f)} fakes and {len(r)} reals of this class: need at least 2 fakes and "
                                "4 reals")
        else:
            a, b, ff = r[perm_r[:m]], r[perm_r[m : 2 * m]], f[perm_f[:m]]
            entry["k"] = kc = min(k, m - 1)
            kw = {"k": kc, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "seed": seed}
            entry["fake"] = distribution_metrics(a, ff, **kw)
            entry["real_baseline"] = distribution_metrics(a, b, **kw)
        out[name] = entry
    return out


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


# ------------------------------------------------------------------------------------------------
# Fixed-budget discriminator (the score that keeps ordering generators when the AUC saturates)
# ------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Held-out results of :func:`fixed_budget_discriminator` (means over folds)."""

    loss: float
    """The score: mean held-out balanced binary cross-entropy, nats (``ln 2`` = chance; higher = closer to real)."""
    loss_sd: float
    """Standard deviation of the per-fold losses."""
    fold_loss: list[float]
    auc: float
    """Mean held-out AUC (reals positive): saturates at 1 where ``loss`` does not."""
    accuracy: float
    """Mean held-out balanced accuracy at logit 0."""
    n_per_side: int
    folds: int

    @property
    def js_lower_bound(self) -> float:
        """``ln 2 - loss``: an estimate from below of the Jensen-Shannon divergence (nats), within this probe's reach."""
        return math.log(2.0) - self.loss

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "js_lower_bound": self.js_lower_bound}


def _balanced_bce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean BCE over reals plus mean over fakes, halved: both sides weigh the same whatever the fold sizes."""
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return 0.5 * (per[y == 1].mean() + per[y == 0].mean())


def fixed_budget_discriminator(real: Tensor, fake: Tensor, *, n: int = 500, folds: int = 5, hidden: int = 64,
                               steps: int = 200, lr: float = 10.0, seed: int = 0) -> ProbeResult:
    """Held-out cross-entropy of a fixed, tiny real-vs-fake MLP on frozen features (module docstring).

    ``real [N, D]``, ``fake [M, D]`` features; ``min(n, N, M)`` of each (a seeded draw), ``folds`` balanced
    folds; per fold an MLP ``D -> hidden -> 1`` (ReLU, init seeded by ``seed`` and the fold) trained by
    full-batch gradient descent, ``steps`` steps of size ``lr / D``, on the other folds, on features centred
    on those folds' pooled mean and divided by their overall standard deviation. Deterministic for equal
    inputs and settings. Raises ``ValueError`` for bad shapes or settings, or fewer than ``2 * folds`` a side.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"fixed_budget_discriminator needs [N, D] and [M, D] features, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    if folds < 2 or hidden < 1 or steps < 1 or not lr > 0:
        raise ValueError(f"fixed_budget_discriminator needs folds >= 2, hidden >= 1, steps >= 1 and lr > 0, got "
                         f"folds={folds}, hidden={hidden}, steps={steps}, lr={lr}")
    m = min(n, len(real), len(fake))
    if m < 2 * folds:
        raise ValueError(f"fixed_budget_discriminator needs at least {2 * folds} images a side for {folds} folds, "
                         f"got {m}")
    gen = torch.Generator().manual_seed(seed)
    r = real[torch.randperm(len(real), generator=gen)[:m]].float()
    f = fake[torch.randperm(len(fake), generator=gen)[:m]].float()
    r_fold, f_fold = _folds(m, folds, gen), _folds(m, folds, gen)
    losses, aucs, accs = [], [], []
    for i in range(folds):
        x_tr = torch.cat([r[r_fold != i], f[f_fold != i]])
        y_tr = torch.cat([torch.ones(int((r_fold != i).sum())), torch.zeros(int((f_fold != i).sum()))])
        x_te = torch.cat([r[r_fold == i], f[f_fold == i]])
        y_te = torch.cat([torch.ones(int((r_fold == i).sum())), torch.zeros(int((f_fold == i).sum()))])
        mu, scale = x_tr.mean(0, keepdim=True), x_tr.var(0).mean().sqrt().clamp_min(1e-12)
        x_tr, x_te = (x_tr - mu) / scale, (x_te - mu) / scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000 * (i + 1))
            probe = nn.Sequential(nn.Linear(x_tr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
        opt = torch.optim.SGD(probe.parameters(), lr=lr / x_tr.shape[1])
        with torch.enable_grad():  # callers may hold a no_grad context (feature extraction)
            for _ in range(steps):
                loss = _balanced_bce(probe(x_tr).squeeze(1), y_tr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            logits = probe(x_te).squeeze(1)
        losses.append(float(_balanced_bce(logits, y_te)))
        aucs.append(binary_auc(logits[y_te == 1], logits[y_te == 0]))
        accs.append(0.5 * float((logits[y_te == 1] > 0).float().mean() + (logits[y_te == 0] <= 0).float().mean()))
    return ProbeResult(float(np.mean(losses)), float(np.std(losses)), losses, float(np.mean(aucs)),
                       float(np.mean(accs)), m, folds)


# ------------------------------------------------------------------------------------------------
# Grids and ranking
# ------------------------------------------------------------------------------------------------


def class_grid(real: Tensor, fake: Tensor, per_row: int, *, real_labels: Tensor | None = None,
               fake_labels: Tensor | None = None, num_classes: int = 0, seed: int = 0) -> Tensor:
    """Images for one grid of ``per_row`` columns: per class a row of reals then a row of its fakes.

    ``real [N, C, H, W]``, ``fake [M, C, H, W]`` in [0, 1]. With ``fake_labels`` (and ``real_labels``,
    ``num_classes``): ``2 * num_classes`` rows, class 0's reals, class 0's fakes, class 1's reals, ...;
    without: one row of reals and one of fakes. Images are a seeded random draw; a row with fewer images
    than ``per_row`` is filled with white. Returns ``[rows * per_row, C, H, W]`` for
    ``save_grid(..., nrow=per_row, value_range=(0, 1))``.
    """
    if per_row < 1:
        raise ValueError(f"class_grid needs per_row >= 1, got {per_row}")
    gen = torch.Generator().manual_seed(seed)
    blank = torch.ones_like(real[:1])

    def row(x: Tensor) -> Tensor:
        pick = x[torch.randperm(len(x), generator=gen)[:per_row]]
        return torch.cat([pick, blank.expand(per_row - len(pick), *blank.shape[1:])])

    if fake_labels is None:
        return torch.cat([row(real), row(fake)])
    if real_labels is None or num_classes < 1:
        raise ValueError("class_grid: fake_labels need real_labels and num_classes")
    return torch.cat([row(x) for c in range(num_classes) for x in (real[real_labels == c], fake[fake_labels == c])])


RANKING_RULE = ("higher fixed-budget discriminator loss first (harder to tell from real images; compared at "
                "the 3 decimals shown), then lower FID")
"""How :func:`rank_audits` orders generators."""


def _rank_key(result: dict[str, Any]) -> tuple[float, float]:
    probe = (result.get("probe") or {}).get("fake") or {}
    loss = probe.get("loss")
    fid = ((result.get("distribution") or {}).get("fake") or {}).get("fid")
    first = -round(loss, 3) if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
    second = fid if isinstance(fid, (int, float)) and math.isfinite(fid) else math.inf
    return first, second


def rank_audits(results: dict[str, dict[str, Any]]) -> list[str]:
    """Names of ``results`` (name -> ``audit.json`` content) best first, by :data:`RANKING_RULE`; audits
    without a fixed-budget score (written before it existed) come last, ordered by FID. Stable for ties."""
    return sorted(results, key=lambda name: _rank_key(results[name]))


__all__ = [
    "RANKING_RULE", "BackboneFeatures", "DiscriminatorResult", "MemorisationResult", "MemorisationSpace",
    "PrecomputedFeatures", "ProbeResult", "binary_auc", "class_grid", "copy_factory", "cross_fit_discriminator",
    "distribution_metrics", "extract_features", "fid_kid", "fixed_budget_discriminator", "load_fake_images",
    "load_fake_labels", "memorisation", "nearest_neighbours", "per_class_metrics", "predict_real", "prdc",
    "rank_audits", "train_discriminator",
]
