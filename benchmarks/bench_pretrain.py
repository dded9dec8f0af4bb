"""Benchmark of the self-supervised pretraining path (not a timed test).

    .venv/bin/python benchmarks/bench_pretrain.py                 # budgets below; ~12 min on a loaded 2-core CPU
    .venv/bin/python benchmarks/bench_pretrain.py knn_steps=200 e2e_batch=256

In one run, on the same data, batch size, cores and machine:

1. **Views alone** (two views per image, no model), images/s: ours (:class:`medpretrain.augment.BatchViews`
   on whole batches, ``cores`` intra-op threads) versus the reference written the way lightly's tutorials
   do it (per-sample PIL ``SimCLRTransform`` in ``cores`` DataLoader workers). The reference uses
   lightly's default parameters with a one-channel normalisation (its ImageNet RGB normalisation cannot
   be applied to grey images). Sizes 28, 64, 128 px; target: >= 4x at 64 px. A third pipeline,
   ``kornia.augmentation`` (batched, per-sample parameters, on the device, the closest composition of our
   operations, :func:`kornia_views`), is timed beside ours in the same rounds (``sections=[views]`` measures
   only this part and keeps the other parts' numbers from the existing JSON).
2. **End to end**: training images/s of the full SimCLR step with our data path (cached split, batched
   views) versus the model-only step rate on random tensors (no data path), measured in alternating
   rounds so that load from other processes hits both alike. Target: within 10 % on the CPU, >= 90 % on a
   GPU (measured only where one is available).
3. **Features after a fixed budget**: ``pretrain/simclr.py`` and ``pretrain/moco.py`` launched through
   ``accelerate launch`` with ``train.max_steps=knn_steps``, then kNN accuracy (k=20, cosine, InstDisc
   weighting) on PneumoniaMNIST validation versus a random-init backbone of the same architecture.

Writes ``benchmarks/results/pretrain.json`` (numbers, budgets, machine, versions, load averages) and
``benchmarks/results/pretrain.md``. Every number in them is measured by this script.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Both sides run under the same OpenMP setting. PASSIVE makes idle OpenMP threads sleep instead of
# spin: on a CPU shared with other jobs, spinning threads wait on descheduled peers and small batched
# ops slow down by up to 20x (measured here). Set before torch is imported (libgomp reads it at load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medpretrain.augment import AugmentConfig, BatchViews  # noqa: E402
from medpretrain.config import ConfigError, DataConfig, load_config  # noqa: E402
from medpretrain.data import build_dataset  # noqa: E402
from medpretrain.knn import extract_features, knn_accuracy  # noqa: E402
from medpretrain.utils import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class BenchConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    cores: int = 0
    """CPU cores for both sides (threads for ours, DataLoader workers for the reference); 0 = all."""
    view_sizes: list[int] = dataclasses.field(default_factory=lambda: [28, 64, 128])
    view_cores: list[int] = dataclasses.field(default_factory=lambda: [1, 0])
    """Core counts for the view comparison (0 = ``cores``): per core, and all cores."""
    view_batch: int = 256
    view_images: int = 2048
    """Images per timed repetition (each image yields two views)."""
    view_repeats: int = 3
    e2e_arch: str = "resnet18"
    e2e_size: int = 28
    e2e_batch: int = 128
    e2e_steps: int = 2
    """Timed steps per round and mode (after one warm-up step per mode)."""
    e2e_rounds: int = 2
    knn_arch: str = "resnet18"
    knn_steps: int = 16
    """Optimizer steps of each pretraining run (the fixed budget)."""
    knn_batch: int = 64
    knn_k: int = 20
    knn_t: float = 0.07
    seed: int = 0
    out: str = "benchmarks/results/pretrain"
    render_only: bool = False
    """Only rewrite the markdown from the existing JSON (no measurement)."""
    sections: list[str] = dataclasses.field(default_factory=lambda: ["views", "e2e", "knn"])
    """Parts to measure; the others keep their numbers from the existing JSON."""
    kornia: bool = True
    """Also time the kornia.augmentation pipeline in the views part."""


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    cpu = cpu_model()
    import accelerate
    import lightly
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import kornia

        kornia_version = kornia.__version__
    except ImportError:
        kornia_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "kornia": kornia_version, "commit": commit, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightly": lightly.__version__, "accelerate": accelerate.__version__, "gpu": gpu}


# --------------------------------------------------------------------------------------------
# 1. views alone
# --------------------------------------------------------------------------------------------


class _RefDataset(torch.utils.data.Dataset):
    """lightly-tutorial style: a PIL image per sample, the transform returns the list of views."""

    def __init__(self, images: np.ndarray, transform):
        self.images = images  # uint8 [N, H, W]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


class _Reference:
    """The lightly-tutorial pipeline, timed in steady state over ``n`` images per call.

    Each call starts fresh workers, lets every worker deliver one batch untimed (start-up), times the
    next ``n`` images, then shuts the workers down, so that no reference worker runs (or prefetches)
    while ours is timed.
    """

    def __init__(self, images_u8: np.ndarray, size: int, batch: int, cores: int):
        from lightly.transforms import SimCLRTransform

        transform = SimCLRTransform(input_size=size, normalize={"mean": [0.5], "std": [0.5]})
        self.size, self.cores = size, cores
        self.loader = torch.utils.data.DataLoader(
            _RefDataset(images_u8, transform), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=cores, persistent_workers=False, prefetch_factor=2,
        )

    def rate(self, n_images: int) -> float:
        it = iter(self.loader)
        for _ in range(self.cores):
            next(it)
        n, t0 = 0, time.perf_counter()
        while n < n_images:
            views, _ = next(it)
            assert len(views) == 2 and views[0].shape[-1] == self.size
            n += views[0].shape[0]
        rate = n / (time.perf_counter() - t0)
        del it  # workers exit before anything else is timed
        return rate


class _Ours:
    """Batched on-device views over the cached split, ``cores`` intra-op threads."""

    def __init__(self, images: torch.Tensor, size: int, batch: int, seed: int):
        self.images, self.size, self.batch = images, size, batch
        self.views = BatchViews(AugmentConfig(), size=size, mean=0.5, std=0.5)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm_gen = torch.Generator().manual_seed(seed)
        self.views.pair(images[:batch], generator=self.gen)  # warm-up

    def rate(self, n_images: int) -> float:
        n, t0 = 0, time.perf_counter()
        while n < n_images:
            idx = torch.randint(len(self.images), (self.batch,), generator=self.perm_gen)
            v0, v1 = self.views.pair(self.images[idx], generator=self.gen)
            assert v0.shape[-1] == self.size
            n += v0.shape[0]
        return n / (time.perf_counter() - t0)


def kornia_views(size: int, mean: float = 0.5, std: float = 0.5, cfg: AugmentConfig | None = None) -> torch.nn.Module:
    """``kornia.augmentation`` composed as close to :class:`BatchViews` as kornia allows (per-sample parameters).

    Differences kornia cannot express: crop and rotation are two resamples, not one affine; contrast is
    kornia's ``RandomContrast`` (scales around 0, not around each image's mean); brightness, contrast and
    gamma are switched on independently instead of together; the noise standard deviation is one value
    (``RandomGaussianNoise``), not a per-sample range.
    """
    import kornia.augmentation as K

    a = cfg or AugmentConfig()
    k = 2 * math.ceil(3 * a.blur_sigma[1]) + 1
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio)),
        K.RandomHorizontalFlip(p=a.hflip_p),
        K.RandomAffine(degrees=a.rotation_deg, padding_mode=a.padding_mode, p=1.0),
        K.RandomBrightness(brightness=(1 - a.brightness, 1 + a.brightness), p=a.intensity_p),
        K.RandomContrast(contrast=(1 - a.contrast, 1 + a.contrast), p=a.intensity_p),
        K.RandomGamma(gamma=tuple(a.gamma), p=a.intensity_p),
        K.RandomGaussianBlur((k, k), tuple(a.blur_sigma), p=a.blur_p),
        K.RandomGaussianNoise(std=a.noise_std[1], p=a.noise_p),
        K.Normalize(mean=torch.tensor([mean]), std=torch.tensor([std])),
    )


class _Kornia(_Ours):
    """``kornia.augmentation`` on whole batches (two views: one call over ``2B`` samples, as ours)."""

    def __init__(self, images: torch.Tensor, size: int, batch: int, seed: int):
        self.images, self.size, self.batch = images, size, batch
        self.aug = kornia_views(size)
        self.perm_gen = torch.Generator().manual_seed(seed)
        self.gen = None  # kornia draws its parameters from the global generator
        torch.manual_seed(seed)
        self.views = self  # type: ignore[assignment]  (rate() calls self.views.pair)
        self.pair(images[:batch])  # warm-up

    def pair(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            both = self.aug(torch.cat([x, x]))
        return both[: x.shape[0]], both[x.shape[0] :]


def bench_views(cfg: BenchConfig, cores: int) -> list[dict]:
    rows = []
    for size in cfg.view_sizes:
        data = dataclasses.replace(cfg.data, image_size=size)
        ds = build_dataset(data, "train", unlabeled=True, normalize=False)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])  # [N, 1, s, s] in [0, 1]
        images_u8 = (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        for n_cores in sorted({c or cores for c in cfg.view_cores}):
            torch.set_num_threads(n_cores)
            reference = _Reference(images_u8, size, cfg.view_batch, n_cores)
            mine = _Ours(images, size, cfg.view_batch, cfg.seed)
            other = _Kornia(images, size, cfg.view_batch, cfg.seed) if cfg.kornia else None
            ref, ours, korn = [], [], []
            for _ in range(cfg.view_repeats):  # alternate, so load from other jobs hits all alike
                ref.append(reference.rate(cfg.view_images))
                ours.append(mine.rate(cfg.view_images))
                if other is not None:
                    korn.append(other.rate(cfg.view_images))
            del reference
            r, o = statistics.median(ref), statistics.median(ours)
            row = {"size": size, "cores": n_cores, "reference_images_per_s": ref, "ours_images_per_s": ours,
                   "reference_median": r, "ours_median": o, "speedup": o / r, "load_after": loadavg()}
            if korn:
                row.update(kornia_images_per_s=korn, kornia_median=statistics.median(korn),
                           ours_over_kornia=o / statistics.median(korn))
            rows.append(row)
            print(f"[views] {size} px, {n_cores} core(s): reference {r:.0f} img/s, ours {o:.0f} img/s, {o / r:.1f}x"
                  + (f"; kornia {row['kornia_median']:.0f} img/s (ours {row['ours_over_kornia']:.1f}x)" if korn else ""),
                  flush=True)
    torch.set_num_threads(cores)
    return rows


# --------------------------------------------------------------------------------------------
# 2. end to end vs model only
# --------------------------------------------------------------------------------------------


def bench_e2e(cfg: BenchConfig, cores: int) -> dict:
    from lightly.loss import NTXentLoss

    from medpretrain.backbones import build_backbone
    from medpretrain.data.loader import image_loader
    from medpretrain.methods.simclr import SimCLR, SimCLRMethodConfig

    torch.set_num_threads(cores)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    data = dataclasses.replace(cfg.data, image_size=cfg.e2e_size)
    ds = build_dataset(data, "train", unlabeled=True, normalize=False)
    loader, sampler_gen, to_images = image_loader(ds, cfg.e2e_batch, True, device)
    views = BatchViews(AugmentConfig(), size=cfg.e2e_size)
    model = SimCLR(build_backbone(cfg.e2e_arch, 1, "auto", image_size=cfg.e2e_size),
                   SimCLRMethodConfig(hidden_dim=512, output_dim=128)).to(device)
    criterion = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    batches = iter(loader)

    def step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        z0, z1 = model.project(torch.cat([x0, x1])).chunk(2)
        loss = criterion(z0, z1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        x0, x1 = views.pair(to_images(batch), generator=gen)
        step(x0, x1)

    shape = (cfg.e2e_batch, 1, cfg.e2e_size, cfg.e2e_size)

    def model_only_step() -> None:
        step(torch.randn(shape, device=device), torch.randn(shape, device=device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    ours_step()
    model_only_step()  # warm-up both
    rates: dict[str, list[float]] = {"model_only": [], "ours": []}
    for r in range(cfg.e2e_rounds):
        order = [("model_only", model_only_step), ("ours", ours_step)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.e2e_steps):
                fn()
            sync()
            rates[name].append(cfg.e2e_steps * cfg.e2e_batch / (time.perf_counter() - t0))
        print(f"[e2e] round {r}: model-only {rates['model_only'][-1]:.1f}, ours {rates['ours'][-1]:.1f} img/s",
              flush=True)
    mo, ou = sum(rates["model_only"]), sum(rates["ours"])
    return {"device": str(device), "arch": cfg.e2e_arch, "size": cfg.e2e_size, "batch": cfg.e2e_batch,
            "rates_images_per_s": rates, "model_only_mean": mo / len(rates["model_only"]),
            "ours_mean": ou / len(rates["ours"]), "ratio": ou / mo, "load_after": loadavg()}


# --------------------------------------------------------------------------------------------
# 3. kNN after a fixed budget
# --------------------------------------------------------------------------------------------


def pretrain(method: str, cfg: BenchConfig, out_dir: Path, cores: int) -> tuple[Path, dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(cores),
           str(ROOT / "pretrain" / f"{method}.py"), f"backbone.arch={cfg.knn_arch}", f"train.max_steps={cfg.knn_steps}",
           f"train.batch_size={cfg.knn_batch}", "train.knn_every=-1", "train.checkpoint_every=0",
           f"train.seed={cfg.seed}", f"out_dir={out_dir}", "run_name=bench"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{method} pretraining failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run = out_dir / "bench"
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh) if r["images_per_s"]]
    return run / "backbone.safetensors", {"wall_s": wall, "script_images_per_s_median": statistics.median(rates)}


def knn_eval(backbone: torch.nn.Module, cfg: BenchConfig) -> dict:
    loader = lambda split: torch.utils.data.DataLoader(build_dataset(cfg.data, split), batch_size=256)  # noqa: E731
    bank, bank_y = extract_features(backbone, loader("train"), "cpu")
    val, val_y = extract_features(backbone, loader("val"), "cpu")
    return {"knn_acc_train_bank": knn_accuracy(val, val_y, bank, bank_y, k=cfg.knn_k, t=cfg.knn_t),
            "knn_acc_val_loo": knn_accuracy(val, val_y, k=cfg.knn_k, t=cfg.knn_t),
            "majority_baseline": float(max(val_y.float().mean(), 1 - val_y.float().mean()))}


def bench_knn(cfg: BenchConfig, cores: int) -> dict:
    from medpretrain.backbones import build_backbone
    from medpretrain.checkpoint import load_backbone

    torch.set_num_threads(cores)
    out: dict = {"arch": cfg.knn_arch, "steps": cfg.knn_steps, "batch": cfg.knn_batch, "image_size": "native (28)"}
    torch.manual_seed(cfg.seed)
    out["random_init"] = knn_eval(build_backbone(cfg.knn_arch, 1, "auto", image_size=28), cfg)
    print(f"[knn] random init: {out['random_init']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        for method in ("simclr", "moco"):
            path, info = pretrain(method, cfg, Path(tmp) / method, cores)
            backbone, meta = load_backbone(path)
            out[method] = {**knn_eval(backbone, cfg), **info, "steps_done": meta.steps}
            print(f"[knn] {method}: {out[method]}", flush=True)
    out["load_after"] = loadavg()
    return out


# --------------------------------------------------------------------------------------------


def write_markdown(path: Path, res: dict) -> None:
    m, c = res["machine"], res["config"]
    lines = [
        "# Self-supervised pretraining benchmark",
        "",
        f"Measured {res['started']} by `benchmarks/bench_pretrain.py` on {m['cpu']} ({m['logical_cpus']} logical CPUs, "
        f"{res['cores']} used by each side), torch {m['torch']}, torchvision {m['torchvision']}, lightly {m['lightly']}, "
        f"accelerate {m['accelerate']}, Python {m['python']}. GPU: {m['gpu'] or 'none'}. "
        f"The CPU was shared with other jobs: load average {res['load_start']} at the start, "
        f"{res['load_end']} at the end (1/5/15 min), so absolute rates are noisy; each comparison is measured "
        "back to back in one process.",
        "",
        "## View pipeline alone (two views per image, no model)",
        "",
        f"Batch {c['view_batch']}, {c['view_images']} images per repetition, median of {c['view_repeats']} repetitions alternating between the two. Reference: lightly "
        f"`SimCLRTransform` (defaults, 1-channel normalisation) on PIL images in as many DataLoader workers as cores. Ours: "
        "`BatchViews` on whole batches with as many threads. Both under `OMP_WAIT_POLICY="
        f"{res['omp_wait_policy']}`.",
        "",
        "| size | cores | reference img/s | ours img/s | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["views"]:
        lines.append(f"| {r['size']} px | {r['cores']} | {r['reference_median']:.0f} | {r['ours_median']:.0f} | "
                     f"{r['speedup']:.1f}x |")
    for r in (r for r in res["views"] if r["size"] == 64):
        lines += ["", f"Target >= 4x at 64 px with {r['cores']} core(s): **{'met' if r['speedup'] >= 4 else 'NOT met'}** "
                  f"({r['speedup']:.1f}x)."]
    e = res["e2e"]
    lines += [
        "",
        "## End to end: training images/s versus the model-only step",
        "",
        f"SimCLR step, {e['arch']} at {e['size']} px, batch {e['batch']}, on {e['device']}; {c['e2e_rounds']} alternating "
        f"rounds of {c['e2e_steps']} steps per mode.",
        "",
        "| model only (random tensors) img/s | ours (cached split + batched views) img/s | ratio |",
        "|---:|---:|---:|",
        f"| {e['model_only_mean']:.1f} | {e['ours_mean']:.1f} | {e['ratio']:.3f} |",
        "",
        f"CPU target (within 10 %): **{'met' if e['ratio'] >= 0.9 else 'NOT met'}**. GPU target (>= 90 %): "
        + (f"measured on {m['gpu']}." if m["gpu"] else "**not measured** - no GPU was available to this run."),
    ]
    k = res["knn"]
    lines += [
        "",
        f"## kNN accuracy on PneumoniaMNIST validation after {k['steps']} steps (batch {k['batch']}, {k['arch']}, 28 px)",
        "",
        f"k={c['knn_k']}, t={c['knn_t']}, cosine, InstDisc weighting. 'train bank' = labelled train split as the bank, "
        "validation as queries; 'val LOO' = leave-one-out within validation. Our train split is not the official "
        "MedMNIST one (3882 images; see ../shared/data/README.md).",
        "",
        "| backbone | kNN acc (train bank) | kNN acc (val LOO) | pretraining wall s | script img/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("random_init", "simclr", "moco"):
        r = k[name]
        lines.append(f"| {name} | {r['knn_acc_train_bank']:.4f} | {r['knn_acc_val_loo']:.4f} | "
                     f"{r.get('wall_s', float('nan')):.0f} | {r.get('script_images_per_s_median', float('nan')):.1f} |")
    n_val = 524
    acc = k["random_init"]["knn_acc_train_bank"]
    se = math.sqrt(acc * (1 - acc) / n_val)
    lines += ["", f"Majority-class baseline on validation: {k['random_init']['majority_baseline']:.4f}. With {n_val} "
              f"validation images the standard error of an accuracy near {acc:.2f} is about {se:.3f}, so differences "
              f"below ~{2 * se:.3f} are not evidence either way. The budget ({k['steps']} steps x {k['batch']} = "
              f"{k['steps'] * k['batch']} images, a quarter of an epoch, chosen to keep the whole benchmark near 10 "
              "minutes on this shared CPU) is far too small to show what pretraining is worth; run with "
              "`knn_steps=...` on a GPU for that. img/s counts images (each gives two views). MoCo's script rate is "
              "higher because only the query view is backpropagated.",
              "", f"Total benchmark wall time: {res['wall_s']:.0f} s.", ""]
    if "views_kornia" in res:
        lines += kornia_markdown(res["views_kornia"])
    path.write_text("\n".join(lines))


def kornia_markdown(kv: dict) -> list[str]:
    """The section comparing ``kornia.augmentation`` with ``BatchViews`` (and lightly's reference)."""
    m, c, rows = kv["machine"], kv["config"], kv["rows"]
    lines = [
        "## kornia.augmentation beside BatchViews (issue 13)",
        "",
        f"Measured {kv['started']} at commit {m.get('commit')} by `benchmarks/bench_pretrain.py sections=[views]` on "
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs, {kv['cores']} used), torch {m['torch']}, kornia {m.get('kornia')}, "
        f"lightly {m['lightly']}, Python {m['python']}, `OMP_WAIT_POLICY={kv['omp_wait_policy']}`; load average "
        f"{kv['load_start']} before, {kv['load_end']} after (a shared CPU: rates are noisy, the three pipelines are "
        f"timed in alternating rounds). Batch {c['view_batch']}, {c['view_images']} images per repetition, median of "
        f"{c['view_repeats']}; two views per image. kornia: `benchmarks/bench_pretrain.py:kornia_views` (crop, flip, "
        "affine rotation with reflection padding, brightness, contrast, gamma, blur, noise, normalise; per-sample "
        "parameters, whole batches, on the images' device).",
        "",
        "| size | cores | lightly reference img/s | BatchViews img/s | kornia img/s | BatchViews / kornia |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} px | {r['cores']} | {r['reference_median']:.0f} | {r['ours_median']:.0f} | "
                     f"{r['kornia_median']:.0f} | {r['ours_over_kornia']:.1f}x |")
    faster = all(r["ours_over_kornia"] > 1 for r in rows)
    lo, hi = min(r["ours_over_kornia"] for r in rows), max(r["ours_over_kornia"] for r in rows)
    lines += ["", ("Decision: `BatchViews` stays the default view pipeline: it is faster than kornia at every "
                   f"measured size and core count ({lo:.1f}x to {hi:.1f}x)." if faster else
                   f"Decision: kornia is faster in some cells (BatchViews / kornia from {lo:.1f}x to {hi:.1f}x); "
                   "`BatchViews` stays the default only because kornia lacks operations it needs (contrast around "
                   "each image's mean, a per-sample noise level, crop and rotation in one resample).")
              + " kornia also lacks, as composed here, contrast around each image's mean and a per-sample noise "
              "standard deviation (see `kornia_views`).", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(BenchConfig, argv)
    if cfg.render_only:
        out = ROOT / cfg.out
        write_markdown(out.with_suffix(".md"), json.loads(out.with_suffix(".json").read_text()))
        return
    cores = cfg.cores or os.cpu_count() or 1
    per_epoch = 3882 // cfg.view_batch  # PneumoniaMNIST train split
    if cfg.data.dataset == "medmnist:pneumoniamnist" and cfg.view_images // cfg.view_batch + cores > per_epoch:
        raise ValueError(f"view_images={cfg.view_images} needs more than one epoch of reference batches")
    unknown = set(cfg.sections) - {"views", "e2e", "knn"}
    if unknown:
        raise ConfigError(f"config key 'sections': unknown {sorted(unknown)}; choose from views, e2e, knn")
    full = set(cfg.sections) == {"views", "e2e", "knn"}
    out = ROOT / cfg.out
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res: dict = {} if full else json.loads(out.with_suffix(".json").read_text())  # a part: keep the rest
    if full:
        res.update({"started": started, "cores": cores, "config": dataclasses.asdict(cfg), "machine": machine(),
                    "load_start": loadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    if "views" in cfg.sections:
        load_start = loadavg()
        rows = bench_views(cfg, cores)
        if full:
            res["views"] = rows
        if cfg.kornia:
            res["views_kornia"] = {"started": started, "cores": cores, "machine": machine(), "rows": rows,
                                   "config": dataclasses.asdict(cfg), "load_start": load_start, "load_end": loadavg(),
                                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if "e2e" in cfg.sections:
        res["e2e"] = bench_e2e(cfg, cores)
        res["gpu_target"] = ("measured" if torch.cuda.is_available()
                             else "not measured: no GPU was available to this run")
    if "knn" in cfg.sections:
        res["knn"] = bench_knn(cfg, cores)
    if full:
        res["load_end"] = loadavg()
        res["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), res)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
