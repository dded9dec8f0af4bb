"""Audit generated images against real ones: realism, distribution distance, memorisation.

    python scripts/audit_synthetic.py --fake runs/generative/dcgan/<run>/samples           # selfsup features
    python scripts/audit_synthetic.py --real medmnist:pneumoniamnist --fake samples.npz --backbone <path>
    python scripts/audit_synthetic.py --fake pngs/ --backbone scratch    # untrained features, said in audit.md
    python scripts/audit_synthetic.py "fakes=[runs/a/samples.npz, runs/b/samples.npz]"   # several, ranked

``--fake``: a ``.npz`` (``images`` or one ``*_images`` array, uint8; the layout of ``generative/sample.py``),
a folder holding ``samples.npz``, or a folder of image files; resized / converted to the real data's size
and channels. ``--backbone``: ``selfsup`` (newest SimCLR / MoCo export under ``runs_dir``; the default),
``simclr``, ``moco``, ``vae``, ``dcgan``, ``imagenet``, a checkpoint path, or ``scratch`` (random init; only
when asked for, and the report then says the feature space is untrained). A missing export fails here
with the command that creates one. All keys: ``python scripts/audit_synthetic.py --help``; defaults in
``configs/audit.yaml``.

What it computes (details in :mod:`medpretrain.audit`):

1. Realism: the backbone + a linear head fine-tuned to tell real (training split) from fake, cross-fitted
   over ``disc.folds`` folds: AUC (0.5 = indistinguishable) and a realism score P(real) for every fake.
2. Distribution metrics in the backbone's feature space: FID, KID, k-NN precision / recall / density /
   coverage of ``n`` fakes against ``n`` real training images (A), beside the same numbers for ``n`` other
   real training images (B) against A: the real-against-real baseline at equal sample sizes.
3. Memorisation: each fake's nearest training image in pixel and feature space, flagged below the
   ``memo.quantile`` of real held-out images' nearest-training distances.
4. Fixed-budget discriminator score: the held-out cross-entropy of a tiny MLP of fixed width trained a fixed
   number of steps on ``probe.n`` real and ``probe.n`` fake features (``probe.*``; definition and reasons in
   :mod:`medpretrain.audit`), beside the same for real vs real. It keeps ordering generators when the AUC
   of item 1 is 1.000 for all of them.
5. Per class, when the ``.npz`` holds ``labels`` (and optionally ``class_names``; ``generative/sample.py``'s
   class-conditional layout) and the real data is labelled: FID / KID / precision / recall / density /
   coverage of the fakes of each class against the reals of that class. Labels that do not fit the real
   classes are refused in one line naming the file.

Writes ``<out>/audit.md``, ``audit.json``, ``config.yaml`` and grids (``most_realistic.png``,
``least_realistic.png``, ``closest_pairs.png``, ``class_grid.png``: per class a row of real images above a
row of fakes). With ``fakes=[a, b, ...]`` each generator is audited into ``<out>/<name>/`` against the same
real images at equal sample sizes (the fewest fakes of any) and ``<out>/ranking.md`` / ``ranking.json``
order them by :data:`medpretrain.audit.RANKING_RULE`, with the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medpretrain import audit  # noqa: E402
from medpretrain.checkpoint import read_meta  # noqa: E402
from medpretrain.cli import UserError  # noqa: E402
from medpretrain.config import ConfigError, DataConfig, config_to_dict, load_config, save_config  # noqa: E402
from medpretrain.data import build_dataset  # noqa: E402
from medpretrain.images import save_grid  # noqa: E402
from medpretrain.init import (  # noqa: E402
    PRETRAIN_METHODS,
    SELFSUP_METHODS,
    ImageNetUnavailable,
    find_latest_export,
    init_backbone,
)
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version, seed_everything  # noqa: E402

DEFAULTS = PROJECT_ROOT / "configs" / "audit.yaml"


@dataclass
class DiscConfig:
    folds: int = 3
    """Cross-fitting folds: every image is scored by a discriminator trained on the other folds."""
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    regime: str = "full"
    """``full``, ``linear``, ``freeze:<k>`` (see medpretrain.regimes)."""
    backbone_lr_mult: float = 0.1
    """Learning-rate multiplier for pretrained backbone weights (ignored for scratch)."""
    weight_decay: float = 1e-4


@dataclass
class MemoConfig:
    quantile: float = 0.01
    """Flag a fake closer to a training image than this quantile of held-out real images are."""
    rule: Literal["both", "any"] = "both"
    """``both``: that close in pixel and feature space (a near-copy); ``any``: in either space."""
    n_heldout: int = 500
    """Real held-out images that calibrate the threshold (0: all of ``heldout_split``)."""
    n_train: int = 0
    """Training images loaded (0: all of ``train_split``): the memorisation reference, and the pool the real
    sides of the discriminator and distribution metrics are drawn from."""
    pairs: int = 8
    """Fakes shown beside their nearest training images in ``closest_pairs.png``."""


@dataclass
class ProbeConfig:
    """The fixed-budget discriminator (:func:`medpretrain.audit.fixed_budget_discriminator`): keep these
    equal across audits whose scores are compared."""

    n: int = 500
    """Real and fake features a side (fewer when fewer fakes or half the training images are at hand)."""
    folds: int = 5
    hidden: int = 64
    """Width of the MLP's one hidden layer."""
    steps: int = 200
    """Full-batch gradient-descent steps per fold: the budget."""
    lr: float = 10.0
    """Step size times the feature dimension D (each step is ``lr / D``)."""


@dataclass
class AuditConfig:
    real: str = ""
    """Real dataset spec (empty: ``data.dataset``)."""
    fake: str = ""
    """Generated images: ``.npz``, a folder with ``samples.npz``, or a folder of images (this or ``fakes``)."""
    fakes: list[str] = field(default_factory=list)
    """Several generators' images (each as for ``fake``): audited into ``<out>/<name>/`` and ranked."""
    fake_key: str = ""
    """Array name in the ``.npz`` (empty: ``images``, else the only ``*_images``)."""
    backbone: str = "selfsup"
    """Feature space and discriminator init: selfsup | simclr | moco | vae | dcgan | imagenet | <path> | scratch."""
    arch: str = "auto"
    """``auto``: the export's architecture (resnet18 for scratch / imagenet)."""
    stem: str = "auto"
    runs_dir: str = "runs"
    """Where named exports are searched (relative to the project root)."""
    train_split: str = "train"
    """The generator's training images: the real side of the discriminator and metrics, and the memorisation reference."""
    heldout_split: str = "val"
    """Real images the generator never saw: they calibrate the memorisation threshold."""
    n_real: int = 1000
    """At most this many images per side for the distribution metrics (A vs fakes, A vs B)."""
    n_fake: int = 2000
    """Use at most this many fakes (a seeded random subset beyond that)."""
    knn_k: int = 5
    kid_subsets: int = 50
    kid_subset_size: int = 100
    grid: int = 16
    """Images in the most / least realistic grids."""
    class_grid: int = 8
    """Images per row of ``class_grid.png`` (per class a real row and a fake row)."""
    seed: int = 0
    batch_size: int = 256
    """Batch size for feature extraction and scoring."""
    threads: int = 0
    """torch threads (0: leave as is)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (feature extraction and the discriminator)."""
    out: str = ""
    """Output folder (empty: runs/audit/<time>)."""
    data: DataConfig = field(default_factory=DataConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    memo: MemoConfig = field(default_factory=MemoConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


_T0 = [time.perf_counter()]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0[0]:5.0f}s] {msg}", flush=True)


def build_backbone(cfg: AuditConfig, in_channels: int, image_size: int) -> tuple[torch.nn.Module, Any]:
    """The pretrained backbone named by ``cfg.backbone``; ``arch=auto`` takes the export's architecture."""
    init, arch = cfg.backbone, cfg.arch
    if arch == "auto":
        if init in ("scratch", "imagenet"):
            arch = "resnet18"
        else:
            if init in PRETRAIN_METHODS or init == "selfsup":
                init = str(find_latest_export(cfg.runs_dir, SELFSUP_METHODS if init == "selfsup" else (init,)))
            arch = read_meta(init).arch
    return init_backbone(init, arch, in_channels, cfg.stem, image_size=image_size, runs_dir=cfg.runs_dir)


def normaliser(info: Any, data: DataConfig, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input normalisation: the checkpoint's own (what it was trained with), else the data config's."""
    mean, std = (info.meta.mean, info.meta.std) if info.meta is not None else (data.mean, data.std)
    shape = (1, channels, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1).reshape(shape)
    return m, s


@dataclass
class Real:
    """The real side, shared by every fake set audited in one call."""

    train: torch.Tensor
    train_names: list[str]
    train_labels: torch.Tensor | None
    """``[N]`` int64 for single-label (binary / multiclass) data, else ``None``."""
    class_names: list[str] | None
    heldout: torch.Tensor
    feats: dict[str, torch.Tensor]
    perm: torch.Tensor
    """A seeded permutation of the training images: A / B sides of the metrics and the discriminator's reals."""


@dataclass
class Fake:
    name: str
    path: str
    n_given: int
    index: torch.Tensor
    """Positions of the fakes used in the file."""
    images: torch.Tensor
    labels: torch.Tensor | None


def load_images(data: DataConfig, split: str, limit: int,
                gen: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor | None, list[str] | None]:
    """``[N, C, H, W]`` in [0, 1] (a seeded random subset of ``limit`` when > 0), the sample names, and the
    labels ``[N]`` and class names when the data has single-label classes (else ``None``)."""
    ds = build_dataset(data, split, unlabeled=True, normalize=False)
    idx = torch.randperm(len(ds), generator=gen)[:limit].sort().values if 0 < limit < len(ds) else torch.arange(len(ds))
    labelled = ds.source.task in ("binary", "multiclass") and ds.source.labels is not None
    labels = torch.from_numpy(ds.source.labels[ds.indices][idx.numpy()].astype(np.int64)) if labelled else None
    return (torch.stack([ds[int(i)]["image"] for i in idx]), [ds.names[int(i)] for i in idx], labels,
            list(ds.class_names) if labelled else None)


def fake_names(paths: list[str]) -> list[str]:
    """A short unique name per fake path: the folder of a ``samples.npz``, else the file or folder name."""
    names: list[str] = []
    for p in map(Path, paths):
        base = p.parent.name if p.name == "samples.npz" else p.stem if p.suffix == ".npz" else p.name
        base = base or "fake"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def load_fakes(cfg: AuditConfig, real: Real, size: tuple[int, int], channels: int) -> list[Fake]:
    """Every fake set, each cut to the same number of images (``n_fake``, or the fewest given) by a seeded draw."""
    paths = cfg.fakes or [cfg.fake]
    loaded = []
    for path in paths:
        images = audit.load_fake_images(path, size, channels, key=cfg.fake_key)
        labels = audit.load_fake_labels(path, len(images), real.class_names)
        loaded.append((path, images, labels))
    m = min(cfg.n_fake, *(len(x) for _, x, _ in loaded))
    fakes = []
    for name, (path, images, labels) in zip(fake_names(paths), loaded, strict=True):
        gen = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(images), generator=gen)[:m].sort().values if len(images) > m else torch.arange(len(images))
        fakes.append(Fake(name, path, len(images), idx, images[idx],
                          None if labels is None else torch.from_numpy(labels)[idx]))
    return fakes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(AuditConfig, argv, defaults_file=DEFAULTS if DEFAULTS.is_file() else None)
    if bool(cfg.fake) == bool(cfg.fakes):
        raise ConfigError("give fake=<.npz or folder> (one generator) or fakes=[<a>, <b>, ...] (several, ranked), "
                          "not both" if cfg.fake else "fake=<.npz or folder> (or fakes=[...]) is required: the "
                          "generated images to audit")
    data = dataclasses.replace(cfg.data, dataset=cfg.real or cfg.data.dataset)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out) if cfg.out else PROJECT_ROOT / "runs" / "audit" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    _T0[0] = time.perf_counter()

    # ---- data: real training / held-out images, all [N, C, H, W] in [0, 1] ------------------------------
    train, train_names, train_labels, class_names = load_images(data, cfg.train_split, cfg.memo.n_train, gen)
    heldout, _, _, _ = load_images(data, cfg.heldout_split, cfg.memo.n_heldout, gen)
    _, channels, height, width = train.shape

    # ---- backbone: the feature space and the discriminator's starting point (fails before any work) ---
    try:
        backbone, info = build_backbone(cfg, channels, height)
    except (FileNotFoundError, ImageNetUnavailable) as e:
        raise UserError(f"backbone={cfg.backbone!r}: not available ({e}); pretrain one, pass a checkpoint path, "
                        "or run with backbone=scratch to audit in an UNTRAINED feature space (audit.md will say "
                        "so)") from None
    backbone = backbone.to(cfg.device)
    mean, std = normaliser(info, data, channels)
    if info.name == "scratch":
        log("WARNING: backbone=scratch: the feature space is untrained (random weights); FID/KID/kNN and "
            "feature-space memorisation measure random-feature statistics only")

    # ---- fakes: loaded (labels checked against the real classes) before any feature pass ---------------
    real = Real(train, train_names, train_labels, class_names, heldout, {}, torch.randperm(len(train), generator=gen))
    fakes = load_fakes(cfg, real, (height, width), channels)
    n_probe = min(cfg.probe.n, len(train) // 2, len(fakes[0].images))
    if n_probe < 2 * cfg.probe.folds:
        raise ConfigError(f"probe: {n_probe} images a side is too few for probe.folds={cfg.probe.folds} (need "
                          f"{2 * cfg.probe.folds}: more fakes, more training images or fewer folds)")
    log(f"real {data.dataset}: {len(train)} {cfg.train_split} + {len(heldout)} {cfg.heldout_split} images "
        f"({channels}x{height}x{width})" + (f", classes {class_names}" if class_names else "") + "; fake "
        + ", ".join(f"{f.path}: {len(f.images)} of {f.n_given} images"
                    + (" (labelled)" if f.labels is not None else "") for f in fakes))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    def features(x: torch.Tensor) -> torch.Tensor:
        return audit.extract_features(backbone, norm(x), cfg.device, batch_size=cfg.batch_size)[0]

    real.feats = {"train": features(train), "heldout": features(heldout)}
    # Per class, the fewest fakes of that class over all fake sets (sets without the class aside), so that
    # ranked sets are compared at equal sample sizes per class too.
    counts = [torch.bincount(f.labels, minlength=len(class_names or [])) for f in fakes if f.labels is not None]
    per_class_n = {c: min([cfg.n_real, *(int(k[c]) for k in counts if k[c] > 0)])
                   for c in range(len(class_names or []))}
    ctx = {"data": data, "backbone": backbone, "info": info, "norm": norm, "features": features, "mean": mean,
           "std": std, "n_probe": n_probe, "per_class_n": per_class_n}
    if not cfg.fakes:
        return audit_one(cfg, ctx, real, fakes[0], out)

    # ---- several generators: one audit each, then the ranking -------------------------------------------
    results = {f.name: audit_one(cfg, ctx, real, f, out / f.name) for f in fakes}
    order = audit.rank_audits(results)
    ranking = {"rule": audit.RANKING_RULE, "order": order,
               "rows": [ranking_row(name, results[name]) for name in order]}
    atomic_write_text(out / "ranking.json", json.dumps(ranking, indent=1) + "\n")
    atomic_write_text(out / "ranking.md", ranking_report(ranking, results))
    log(f"ranking ({audit.RANKING_RULE}):")
    for i, row in enumerate(ranking["rows"], 1):
        log(f"  {i}. {row['name']}: fixed-budget D loss {_f(row['probe_loss'])}, FID {_f(row['fid'])}, "
            f"cross-fitted AUC {_f(row['auc'])}")
    log(f"wrote {out / 'ranking.md'}")
    return {"ranking": ranking, "audits": results}


def audit_one(cfg: AuditConfig, ctx: dict[str, Any], real: Real, fk: Fake, out: Path) -> dict[str, Any]:
    """Audit one fake set against ``real``; writes ``audit.md``, ``audit.json`` and the grids into ``out``."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, fake = real.train, real.heldout, fk.images
    info, norm = ctx["info"], ctx["norm"]
    untrained = info.name == "scratch"
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the fake-side draws; the real side is real.perm
    feats = {**real.feats, "fake": ctx["features"](fake)}

    # ---- distribution metrics: A (real) vs fakes, beside A vs B (real) at the same n ----------------------
    n = min(cfg.n_real, len(train) // 2, len(fake))
    a_idx, b_idx = real.perm[:n], real.perm[n : 2 * n]
    f_idx = torch.randperm(len(fake), generator=gen)[:n]
    k = min(cfg.knn_k, n - 1)
    kw = {"k": k, "kid_subsets": cfg.kid_subsets, "kid_subset_size": cfg.kid_subset_size, "seed": cfg.seed}
    dist = {"fake": audit.distribution_metrics(feats["train"][a_idx], feats["fake"][f_idx], **kw),
            "real_baseline": audit.distribution_metrics(feats["train"][a_idx], feats["train"][b_idx], **kw)}
    log(f"[{fk.name}] FID {dist['fake']['fid']:.3f} (real vs real {dist['real_baseline']['fid']:.3f}), "
        f"KID {dist['fake']['kid']:.4f} ({dist['real_baseline']['kid']:.4f}), n={n} per side")

    # ---- fixed-budget discriminator on the frozen features: fake vs real beside real vs real -------------
    p, n_probe = cfg.probe, ctx["n_probe"]
    pkw = {"n": n_probe, "folds": p.folds, "hidden": p.hidden, "steps": p.steps, "lr": p.lr, "seed": cfg.seed}
    probe_a, probe_b = feats["train"][real.perm[:n_probe]], feats["train"][real.perm[n_probe : 2 * n_probe]]
    probe = {"fake": audit.fixed_budget_discriminator(probe_a, feats["fake"], **pkw).to_dict(),
             "real_baseline": audit.fixed_budget_discriminator(probe_a, probe_b, **pkw).to_dict()}
    log(f"[{fk.name}] fixed-budget discriminator loss {probe['fake']['loss']:.3f} ± {probe['fake']['loss_sd']:.3f} "
        f"nats (real vs real {probe['real_baseline']['loss']:.3f}; ln 2 = 0.693 is chance), its AUC "
        f"{probe['fake']['auc']:.3f}")

    # ---- per class (labelled fakes against the reals of their class) ------------------------------------
    per_class = None
    if fk.labels is not None and real.train_labels is not None and real.class_names:
        per_class = audit.per_class_metrics(feats["train"], real.train_labels, feats["fake"], fk.labels,
                                            real.class_names, n=ctx["per_class_n"], **kw)
        log(f"[{fk.name}] per class: " + ", ".join(
            f"{c}: " + ("skipped" if "skipped" in e else f"FID {e['fake']['fid']:.2f} ({e['real_baseline']['fid']:.2f}), "
                        f"coverage {e['fake']['coverage']:.3f}") for c, e in per_class.items()))

    # ---- discriminator, cross-fitted: a realism score for every fake --------------------------------------
    r_idx = real.perm[: len(fake)]
    d = cfg.disc
    disc = audit.cross_fit_discriminator(
        audit.copy_factory(ctx["backbone"]), norm(train[r_idx]), norm(fake), folds=d.folds, epochs=d.epochs,
        batch_size=d.batch_size, lr=d.lr, regime=d.regime, backbone_lr_mult=d.backbone_lr_mult,
        weight_decay=d.weight_decay, pretrained=not untrained, seed=cfg.seed, device=cfg.device,
        on_fold=lambda i, r: log(f"  discriminator fold {i + 1}/{d.folds}: AUC {r['auc']:.3f}, "
                                 f"train loss {r['train_loss']:.3f}"))
    lo, hi = disc.auc_ci(seed=cfg.seed)
    rank = disc.fake_realism_rank()
    log(f"[{fk.name}] discriminator AUC {disc.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}; 0.5 = indistinguishable, "
        f"chance sd {disc.null_sd:.3f})")

    # ---- memorisation ----------------------------------------------------------------------------------
    memo = audit.memorisation(fake, train, heldout, feats["fake"], feats["train"], feats["heldout"],
                              quantile=cfg.memo.quantile, rule=cfg.memo.rule)
    flagged = memo.flagged
    log(f"[{fk.name}] memorisation: {int(flagged.sum())}/{len(fake)} fakes flagged as near-copies of training "
        "images " + ", ".join(f"{s}: {int(m.flagged.sum())} (threshold {m.threshold:.4f})" for s, m in memo.spaces.items()))

    # ---- grids -----------------------------------------------------------------------------------------
    order = torch.argsort(rank + 1e-6 * disc.fake_scores, descending=True)  # rank, then P(real) breaks ties
    g = min(cfg.grid, len(fake))
    save_grid(fake[order[:g]], out / "most_realistic.png", value_range=(0, 1))
    save_grid(fake[order.flip(0)[:g]], out / "least_realistic.png", value_range=(0, 1))
    pix, fea = memo.spaces["pixel"], memo.spaces["feature"]
    closest = torch.argsort(pix.distance - 1e3 * flagged.float())[: cfg.memo.pairs]  # flagged first, then closest
    triplets = torch.stack([torch.stack([fake[i], train[pix.index[i]], train[fea.index[i]]]) for i in closest])
    save_grid(triplets.flatten(0, 1), out / "closest_pairs.png", nrow=3, value_range=(0, 1))
    by_class = per_class is not None
    rows = audit.class_grid(train, fake, cfg.class_grid, real_labels=real.train_labels if by_class else None,
                            fake_labels=fk.labels if by_class else None,
                            num_classes=len(real.class_names or []), seed=cfg.seed)
    save_grid(rows, out / "class_grid.png", nrow=cfg.class_grid, value_range=(0, 1))

    # ---- results ---------------------------------------------------------------------------------------
    channels, height, width = train.shape[1:]
    backbone, mean, std = ctx["backbone"], ctx["mean"], ctx["std"]
    results: dict[str, Any] = {
        "code_version": code_version(),
        "config": config_to_dict(cfg),
        "real": {"dataset": ctx["data"].dataset, "train_split": cfg.train_split, "n_train": len(train),
                 "heldout_split": cfg.heldout_split, "n_heldout": len(heldout),
                 "shape": [channels, height, width], "class_names": real.class_names},
        "fake": {"name": fk.name, "path": fk.path, "n_given": fk.n_given, "n_used": len(fake),
                 "labelled": fk.labels is not None},
        "backbone": {"init": info.name, "source": info.source, "arch": getattr(backbone, "arch", "?"),
                     "untrained": untrained, "notes": list(info.notes),
                     "normalisation": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}},
        "discriminator": {"auc": disc.auc, "auc_ci95": [lo, hi], "fold_auc": disc.fold_auc,
                          "pooled_auc": disc.pooled_auc,
                          "chance_sd": disc.null_sd, "n_real": len(r_idx), "n_fake": len(fake),
                          "train_loss": disc.final_loss},
        "probe": {"definition": "held-out balanced BCE (nats) of an MLP D-hidden-1 trained a fixed number of "
                                "full-batch gradient-descent steps (size lr / D) on frozen features; ln 2 = "
                                "chance, higher = closer to real",
                  "n_per_side": n_probe, "folds": p.folds, "hidden": p.hidden, "steps": p.steps, "lr": p.lr,
                  **probe},
        "distribution": {"n_per_side": n, **dist},
        "per_class": per_class,
        "memorisation": {
            "quantile": memo.quantile, "rule": memo.rule, "n_flagged": int(flagged.sum()),
            "heldout_duplicates": int(memo.heldout_duplicates.sum()),
            **{s: {"threshold": m.threshold, "n_flagged": int(m.flagged.sum()), "heldout_flag_rate": m.heldout_flag_rate,
                   "heldout_distance_median": float(m.heldout_distance.median()),
                   "fake_distance_median": float(m.distance.median())} for s, m in memo.spaces.items()},
        },
        "per_image": [
            {"fake_index": int(fk.index[i]), "realism": float(disc.fake_scores[i]),
             "realism_rank": float(rank[i]), "fold": int(disc.fake_fold[i]),
             **({"label": int(fk.labels[i])} if fk.labels is not None else {}),
             "nn_pixel": {"train": real.train_names[int(pix.index[i])], "distance": float(pix.distance[i])},
             "nn_feature": {"train": real.train_names[int(fea.index[i])], "distance": float(fea.distance[i])},
             "flagged": bool(flagged[i])}
            for i in range(len(fake))
        ],
        "wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(out / "audit.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "audit.md", report(results, closest.tolist()))
    log(f"[{fk.name}] wrote {out / 'audit.md'} and audit.json ({results['wall_s']:.0f} s)")
    return results


def ranking_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """The numbers the ranking shows for one audit."""
    fk, pr = r["distribution"]["fake"], r["probe"]["fake"]
    classes = [e for e in (r.get("per_class") or {}).values() if "fake" in e]
    return {"name": name, "path": r["fake"]["path"], "probe_loss": pr["loss"], "probe_loss_sd": pr["loss_sd"],
            "probe_auc": pr["auc"], "auc": r["discriminator"]["auc"], "fid": fk["fid"],
            "fid_baseline": r["distribution"]["real_baseline"]["fid"], "precision": fk["precision"],
            "recall": fk["recall"], "coverage": fk["coverage"],
            "class_fid_mean": float(np.mean([e["fake"]["fid"] for e in classes])) if classes else None,
            "class_coverage_min": min(e["fake"]["coverage"] for e in classes) if classes else None,
            "memorised": r["memorisation"]["n_flagged"], "n_fake": r["fake"]["n_used"]}


def ranking_report(ranking: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    first = results[ranking["order"][0]]
    base = first["probe"]["real_baseline"]
    lines = ["# Generators ranked", "",
             f"Order: {ranking['rule']}. Each generator's {first['fake']['n_used']} fakes were audited against "
             f"the same real images (`{first['real']['dataset']}`, {first['real']['train_split']} split) in the "
             f"**{first['backbone']['init']}** feature space; fixed-budget discriminator with "
             f"{first['probe']['n_per_side']} images a side (real vs real: {_f(base['loss'])} nats; "
             "ln 2 = 0.693 is chance, higher = harder to tell from real).", "",
             "| rank | generator | fixed-budget D loss (nats) | its AUC | cross-fitted AUC | FID (real vs real) | "
             "precision | recall | coverage | per-class FID (mean) | lowest class coverage | memorised | report |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(ranking["rows"], 1):
        lines.append(
            f"| {i} | {row['name']} | {_f(row['probe_loss'])} ± {_f(row['probe_loss_sd'])} | {_f(row['probe_auc'])} | "
            f"{_f(row['auc'])} | {_g(row['fid'])} ({_g(row['fid_baseline'])}) | {_f(row['precision'])} | "
            f"{_f(row['recall'])} | {_f(row['coverage'])} | {_g(row['class_fid_mean'])} | "
            f"{_f(row['class_coverage_min'])} | {row['memorised']} / {row['n_fake']} | "
            f"[audit.md]({row['name']}/audit.md) |")
    return "\n".join([*lines, ""])


def _f(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "-"
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{nd}f}"


def _g(x: float | None) -> str:
    """4 significant digits: FID's scale depends on the feature space (0.005 in random features, 900 in others)."""
    return "-" if x is None else f"{x:.4g}"


def report(r: dict[str, Any], closest: list[int]) -> str:
    b, dc, ds, mm, pr = r["backbone"], r["discriminator"], r["distribution"], r["memorisation"], r["probe"]
    fk, rb = ds["fake"], ds["real_baseline"]
    lines = [
        "# Synthetic sample audit", "",
        f"Real: `{r['real']['dataset']}` ({r['real']['train_split']} split, {r['real']['n_train']} images; "
        f"{r['real']['heldout_split']} split, {r['real']['n_heldout']} held-out images), "
        f"{'x'.join(map(str, r['real']['shape']))}. Fake: `{r['fake']['path']}` ({r['fake']['n_used']} of "
        f"{r['fake']['n_given']} images, resized / converted to the real data's size and channels).", "",
        f"Feature space and discriminator start: **{b['init']}** {b['arch']} (`{b['source']}`). "
        f"Code {r['code_version']}.", "",
    ]
    if b["untrained"]:
        lines += ["> **Warning: the feature space is UNTRAINED** (`backbone=scratch`, random weights). FID, KID, "
                  "precision / recall / density / coverage and feature-space memorisation are measured with random "
                  "features: they compare low-level statistics only and are not comparable with audits in a "
                  "pretrained feature space. The discriminator is trained from scratch.", ""]
    lines += [
        "## Summary", "",
        f"Distribution metrics compare {ds['n_per_side']} fakes with {ds['n_per_side']} real training images (A); "
        f"the baseline compares {ds['n_per_side']} other real training images (B) with the same A, so a perfect "
        "generator would score about the baseline.", "",
        "| metric | fake vs real | real vs real (baseline) | reading |", "|---|---|---|---|",
        f"| discriminator AUC (cross-fitted) | {_f(dc['auc'])} (95% CI {_f(dc['auc_ci95'][0])}-{_f(dc['auc_ci95'][1])}) "
        f"| 0.5 ± {_f(2 * dc['chance_sd'])} (chance, 2 sd) | 0.5: indistinguishable, 1: every fake spotted |",
        f"| fixed-budget discriminator loss (nats; {pr['n_per_side']} a side) | {_f(pr['fake']['loss'])} ± "
        f"{_f(pr['fake']['loss_sd'])} (its AUC {_f(pr['fake']['auc'])}) | {_f(pr['real_baseline']['loss'])} ± "
        f"{_f(pr['real_baseline']['loss_sd'])} | ln 2 = 0.693: chance; lower: fakes told apart more confidently |",
        f"| FID | {_f(fk['fid'])} | {_f(rb['fid'])} | lower is closer |",
        f"| KID (x1000) | {_f(1000 * fk['kid'], 2)} ± {_f(1000 * fk['kid_std'], 2)} | {_f(1000 * rb['kid'], 2)} "
        f"± {_f(1000 * rb['kid_std'], 2)} | 0 when equal in distribution |",
        f"| precision (k={fk['k']}) | {_f(fk['precision'])} | {_f(rb['precision'])} | fakes inside the real manifold |",
        f"| recall | {_f(fk['recall'])} | {_f(rb['recall'])} | reals covered by the fake manifold |",
        f"| density | {_f(fk['density'])} | {_f(rb['density'])} | ~1 when matched; >1 crowding on modes |",
        f"| coverage | {_f(fk['coverage'])} | {_f(rb['coverage'])} | real neighbourhoods that hold a fake |",
    ]
    lines.append(f"| memorised (near-copies: below the threshold in {mm['rule']} spaces) | {mm['n_flagged']} / "
                 f"{dc['n_fake']} flagged | - | copies of training images |")
    for s in ("pixel", "feature"):
        m = mm[s]
        lines.append(f"| below threshold ({s} space) | {m['n_flagged']} / {dc['n_fake']} flagged | "
                     f"{100 * m['heldout_flag_rate']:.1f}% of held-out reals (by construction) | closer than held-out reals |")
    if r.get("per_class"):
        lines += ["", "## Per class", "",
                  "Fakes labelled with class c against real training images of class c (A), beside other real "
                  "images of class c (B) against the same A; sample sizes per class below.", "",
                  "| class | n per side | FID | precision | recall | density | coverage |", "|---|---|---|---|---|---|---|"]
        for name, e in r["per_class"].items():
            if "skipped" in e:
                lines.append(f"| {name} | {e['n_per_side']} | skipped: {e['skipped']} | | | | |")
                continue
            cf, cb = e["fake"], e["real_baseline"]
            lines.append(f"| {name} | {e['n_per_side']} (k={e['k']}) | {_g(cf['fid'])} ({_g(cb['fid'])}) | "
                         + " | ".join(f"{_f(cf[m])} ({_f(cb[m])})" for m in ("precision", "recall", "density", "coverage"))
                         + " |")
        lines += ["", "Real vs real (B against A) in brackets."]
    classes = r["real"].get("class_names") if r.get("per_class") else None
    lines += [
        "", "## Fixed-budget discriminator", "",
        f"An MLP ({pr['hidden']} hidden units) trained {pr['steps']} full-batch gradient-descent steps (size "
        f"{pr['lr']:g} / D) on "
        f"the frozen features of {pr['n_per_side']} real training images and {pr['n_per_side']} fakes, "
        f"{pr['folds']}-fold cross-fitted; the score is its held-out cross-entropy (reals and fakes weighted "
        "equally). Unlike the AUC it keeps falling as the fakes move further from the reals, so it still orders "
        "generators whose AUC is 1.000; compare it only between audits with equal sizes and settings "
        f"(`probe.*`). Held-out accuracy {_f(pr['fake']['accuracy'])}; ln 2 - loss = "
        f"{_f(pr['fake']['js_lower_bound'])} nats (an estimate from below of the Jensen-Shannon divergence; "
        f"real vs real {_f(pr['real_baseline']['js_lower_bound'])}).", "",
        "## Real and fake images" + (" per class" if classes else ""), "",
        ("Rows: " + ", ".join(f"{c} (real), {c} (fake)" for c in classes) if classes
         else "Top row: real training images; bottom row: fakes") + ": ![real and fake](class_grid.png)",
    ]
    lines += [
        "", "## Realism (transfer-learned discriminator)", "",
        f"A {b['arch']} from `{b['init']}` plus a linear head, fine-tuned ({r['config']['disc']['regime']}, "
        f"{r['config']['disc']['epochs']} epochs) to tell {dc['n_real']} real training images from {dc['n_fake']} "
        f"fakes, with {len(dc['fold_auc'])}-fold cross-fitting: each image is scored by the discriminator that "
        f"did not train on it. AUC = mean of the per-fold held-out AUCs ({', '.join(_f(a) for a in dc['fold_auc'])}); "
        f"the AUC of all out-of-fold scores pooled is {_f(dc['pooled_auc'])} (lower when the folds' "
        "discriminators are calibrated differently). Per fake, `audit.json` (`per_image`) holds `realism` = "
        "P(real) from its fold's discriminator and `realism_rank` = the fraction of that fold's real images "
        "scored lower (comparable across folds; ~0.5 = as real-looking as a typical real image).", "",
        "Most realistic fakes (highest realism rank, row by row): ![most realistic](most_realistic.png)", "",
        "Least realistic fakes: ![least realistic](least_realistic.png)", "",
        "## Memorisation", "",
        f"For each fake, the nearest of {r['real']['n_train']} training images in pixel space (RMS difference on "
        "[0, 1]) and in feature space (Euclidean between L2-normalised features). A fake is flagged when that "
        f"distance is at most the {100 * mm['quantile']:g}% quantile of the same distance for "
        f"{r['real']['n_heldout'] - mm['heldout_duplicates']} real held-out images (images the generator never saw). "
        f"{mm['heldout_duplicates']} held-out images are exact copies of training images in the dataset itself and "
        "are left out of this calibration.", "",
        "| space | threshold | held-out median | fake median | flagged |", "|---|---|---|---|---|",
    ]
    for s in ("pixel", "feature"):
        m = mm[s]
        lines.append(f"| {s} | {_f(m['threshold'], 4)} | {_f(m['heldout_distance_median'], 4)} | "
                     f"{_f(m['fake_distance_median'], 4)} | {m['n_flagged']} |")
    lines += ["", f"{mm['n_flagged']} fakes flagged ({'below both thresholds' if mm['rule'] == 'both' else 'below either threshold'}). The {len(closest)} fakes closest to a training "
              "image (flagged ones first), each row: fake | nearest training image (pixel) | nearest training image "
              "(feature): ![closest pairs](closest_pairs.png)", "",
              "| fake | nearest training image (pixel) | distance | nearest (feature) | distance | flagged |",
              "|---|---|---|---|---|---|"]
    for i in closest:
        p = r["per_image"][i]
        lines.append(f"| {p['fake_index']} | {p['nn_pixel']['train']} | {_f(p['nn_pixel']['distance'], 4)} | "
                     f"{p['nn_feature']['train']} | {_f(p['nn_feature']['distance'], 4)} | {'yes' if p['flagged'] else ''} |")
    if b["notes"]:
        lines += ["", "Backbone notes: " + "; ".join(b["notes"])]
    lines += ["", f"Wall-clock {r['wall_s']:.0f} s. Config: `config.yaml`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
