"""Audit generated images against real ones: realism, distribution distance, memorisation.

    python scripts/audit_synthetic.py --fake runs/generative/dcgan/<run>/samples           # selfsup features
    python scripts/audit_synthetic.py --real medmnist:pneumoniamnist --fake samples.npz --backbone <path>
    python scripts/audit_synthetic.py --fake pngs/ --backbone scratch    # untrained features, said in audit.md

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

Writes ``<out>/audit.md``, ``audit.json``, ``config.yaml`` and grids (``most_realistic.png``,
``least_realistic.png``, ``closest_pairs.png``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
class AuditConfig:
    real: str = ""
    """Real dataset spec (empty: ``data.dataset``)."""
    fake: str = ""
    """Generated images: ``.npz``, a folder with ``samples.npz``, or a folder of images (required)."""
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


_T0 = [time.perf_counter()]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0[0]:5.0f}s] {msg}", flush=True)


def load_images(data: DataConfig, split: str, limit: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``[N, C, H, W]`` in [0, 1] (a seeded random subset of ``limit`` when > 0) and the sample names."""
    ds = build_dataset(data, split, unlabeled=True, normalize=False)
    idx = torch.randperm(len(ds), generator=gen)[:limit].sort().values if 0 < limit < len(ds) else torch.arange(len(ds))
    return torch.stack([ds[int(i)]["image"] for i in idx]), [ds.names[int(i)] for i in idx]


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(AuditConfig, argv, defaults_file=DEFAULTS if DEFAULTS.is_file() else None)
    if not cfg.fake:
        raise ConfigError("fake=<.npz or folder> is required (the generated images to audit)")
    data = dataclasses.replace(cfg.data, dataset=cfg.real or cfg.data.dataset)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out) if cfg.out else PROJECT_ROOT / "runs" / "audit" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    t0 = _T0[0] = time.perf_counter()

    # ---- data: real training / held-out images and the fakes, all [N, C, H, W] in [0, 1] -------------
    train, train_names = load_images(data, cfg.train_split, cfg.memo.n_train, gen)
    heldout, _ = load_images(data, cfg.heldout_split, cfg.memo.n_heldout, gen)
    _, channels, height, width = train.shape

    # ---- backbone: the feature space and the discriminator's starting point (fails before any work) ---
    try:
        backbone, info = build_backbone(cfg, channels, height)
    except (FileNotFoundError, ImageNetUnavailable) as e:
        raise UserError(f"backbone={cfg.backbone!r}: not available ({e}); pretrain one, pass a checkpoint path, "
                        "or run with backbone=scratch to audit in an UNTRAINED feature space (audit.md will say "
                        "so)") from None
    untrained = info.name == "scratch"
    backbone = backbone.to(cfg.device)
    mean, std = normaliser(info, data, channels)
    norm = lambda x: (x - mean) / std  # noqa: E731
    if untrained:
        log("WARNING: backbone=scratch: the feature space is untrained (random weights); FID/KID/kNN and "
            "feature-space memorisation measure random-feature statistics only")

    fake_all = audit.load_fake_images(cfg.fake, (height, width), channels, key=cfg.fake_key)
    fake_idx = (torch.randperm(len(fake_all), generator=gen)[: cfg.n_fake].sort().values
                if len(fake_all) > cfg.n_fake else torch.arange(len(fake_all)))
    fake = fake_all[fake_idx]
    log(f"real {data.dataset}: {len(train)} {cfg.train_split} + {len(heldout)} {cfg.heldout_split} images "
        f"({channels}x{height}x{width}); fake {cfg.fake}: {len(fake)} of {len(fake_all)} images")

    # ---- features ---------------------------------------------------------------------------------------
    feats = {name: audit.extract_features(backbone, norm(x), cfg.device, batch_size=cfg.batch_size)[0]
             for name, x in (("train", train), ("heldout", heldout), ("fake", fake))}

    # ---- distribution metrics: A (real) vs fakes, beside A vs B (real) at the same n ----------------------
    n = min(cfg.n_real, len(train) // 2, len(fake))
    perm = torch.randperm(len(train), generator=gen)
    a_idx, b_idx = perm[:n], perm[n : 2 * n]
    f_idx = torch.randperm(len(fake), generator=gen)[:n]
    k = min(cfg.knn_k, n - 1)
    dist: dict[str, dict[str, float]] = {}
    for name, other in (("fake", feats["fake"][f_idx]), ("real_baseline", feats["train"][b_idx])):
        dist[name] = {**audit.fid_kid(feats["train"][a_idx], other, kid_subsets=cfg.kid_subsets,
                                      kid_subset_size=cfg.kid_subset_size, seed=cfg.seed),
                      **audit.prdc(feats["train"][a_idx], other, k=k)}
    log(f"FID {dist['fake']['fid']:.3f} (real vs real {dist['real_baseline']['fid']:.3f}), "
        f"KID {dist['fake']['kid']:.4f} ({dist['real_baseline']['kid']:.4f}), n={n} per side")

    # ---- discriminator, cross-fitted: a realism score for every fake --------------------------------------
    r_idx = torch.randperm(len(train), generator=gen)[: len(fake)]
    d = cfg.disc
    disc = audit.cross_fit_discriminator(
        audit.copy_factory(backbone), norm(train[r_idx]), norm(fake), folds=d.folds, epochs=d.epochs,
        batch_size=d.batch_size, lr=d.lr, regime=d.regime, backbone_lr_mult=d.backbone_lr_mult,
        weight_decay=d.weight_decay, pretrained=not untrained, seed=cfg.seed, device=cfg.device,
        on_fold=lambda i, r: log(f"  discriminator fold {i + 1}/{d.folds}: AUC {r['auc']:.3f}, "
                                 f"train loss {r['train_loss']:.3f}"))
    lo, hi = disc.auc_ci(seed=cfg.seed)
    rank = disc.fake_realism_rank()
    log(f"discriminator AUC {disc.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}; 0.5 = indistinguishable, "
        f"chance sd {disc.null_sd:.3f})")

    # ---- memorisation ----------------------------------------------------------------------------------
    memo = audit.memorisation(fake, train, heldout, feats["fake"], feats["train"], feats["heldout"],
                              quantile=cfg.memo.quantile, rule=cfg.memo.rule)
    flagged = memo.flagged
    log(f"memorisation: {int(flagged.sum())}/{len(fake)} fakes flagged as near-copies of training images "
        + ", ".join(f"{s}: {int(m.flagged.sum())} (threshold {m.threshold:.4f})" for s, m in memo.spaces.items()))

    # ---- grids -----------------------------------------------------------------------------------------
    order = torch.argsort(rank + 1e-6 * disc.fake_scores, descending=True)  # rank, then P(real) breaks ties
    g = min(cfg.grid, len(fake))
    save_grid(fake[order[:g]], out / "most_realistic.png", value_range=(0, 1))
    save_grid(fake[order.flip(0)[:g]], out / "least_realistic.png", value_range=(0, 1))
    pix, fea = memo.spaces["pixel"], memo.spaces["feature"]
    closest = torch.argsort(pix.distance - 1e3 * flagged.float())[: cfg.memo.pairs]  # flagged first, then closest
    triplets = torch.stack([torch.stack([fake[i], train[pix.index[i]], train[fea.index[i]]]) for i in closest])
    save_grid(triplets.flatten(0, 1), out / "closest_pairs.png", nrow=3, value_range=(0, 1))

    # ---- results ---------------------------------------------------------------------------------------
    results: dict[str, Any] = {
        "code_version": code_version(),
        "config": config_to_dict(cfg),
        "real": {"dataset": data.dataset, "train_split": cfg.train_split, "n_train": len(train),
                 "heldout_split": cfg.heldout_split, "n_heldout": len(heldout),
                 "shape": [channels, height, width]},
        "fake": {"path": cfg.fake, "n_given": len(fake_all), "n_used": len(fake)},
        "backbone": {"init": info.name, "source": info.source, "arch": getattr(backbone, "arch", "?"),
                     "untrained": untrained, "notes": list(info.notes),
                     "normalisation": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}},
        "discriminator": {"auc": disc.auc, "auc_ci95": [lo, hi], "fold_auc": disc.fold_auc,
                          "pooled_auc": disc.pooled_auc,
                          "chance_sd": disc.null_sd, "n_real": len(r_idx), "n_fake": len(fake),
                          "train_loss": disc.final_loss},
        "distribution": {"n_per_side": n, **dist},
        "memorisation": {
            "quantile": memo.quantile, "rule": memo.rule, "n_flagged": int(flagged.sum()),
            "heldout_duplicates": int(memo.heldout_duplicates.sum()),
            **{s: {"threshold": m.threshold, "n_flagged": int(m.flagged.sum()), "heldout_flag_rate": m.heldout_flag_rate,
                   "heldout_distance_median": float(m.heldout_distance.median()),
                   "fake_distance_median": float(m.distance.median())} for s, m in memo.spaces.items()},
        },
        "per_image": [
            {"fake_index": int(fake_idx[i]), "realism": float(disc.fake_scores[i]),
             "realism_rank": float(rank[i]), "fold": int(disc.fake_fold[i]),
             "nn_pixel": {"train": train_names[int(pix.index[i])], "distance": float(pix.distance[i])},
             "nn_feature": {"train": train_names[int(fea.index[i])], "distance": float(fea.distance[i])},
             "flagged": bool(flagged[i])}
            for i in range(len(fake))
        ],
        "wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(out / "audit.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "audit.md", report(results, closest.tolist()))
    log(f"wrote {out / 'audit.md'} and audit.json ({results['wall_s']:.0f} s)")
    return results


def _f(x: float, nd: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def report(r: dict[str, Any], closest: list[int]) -> str:
    b, dc, ds, mm = r["backbone"], r["discriminator"], r["distribution"], r["memorisation"]
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
