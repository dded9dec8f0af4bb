"""Fine-tune one initialisation on a labelled task: one init, one regime, one label fraction, one seed.

    accelerate launch finetune/run.py --config configs/finetune.yaml --init selfsup --regime linear
    accelerate launch finetune/run.py --config configs/finetune_busi.yaml init=imagenet data.label_fraction=0.1

``--init`` is ``scratch``, ``imagenet``, ``selfsup`` / ``simclr`` / ``moco`` / ``vae`` / ``dcgan`` (the
latest export under ``runs_dir``) or a path to a backbone checkpoint (:mod:`medpretrain.init`).
``--regime`` is ``linear``, ``freeze:<k>``, ``full`` or ``reinit:<k>`` (:mod:`medpretrain.regimes`).

Model selection uses the validation split only (best validation AUC, optional early stopping); the
test split is evaluated exactly once, at the end, with the selected weights. Output folder
(default ``runs/finetune/<task>/<init>/<regime>/<fraction>/seed<k>``):

* ``results.json``: test metrics, bootstrap CIs, ROC points, per-epoch history, config + hash, init
  info (source, sha256), data fingerprint, timings; ``status`` is ``complete`` or ``unavailable`` (the
  ImageNet weights are missing: the run stops, it never falls back to random weights);
* ``predictions.npz``: test probabilities, labels and indices (``scripts/compare.py`` ensembles them);
* ``model.safetensors`` (backbone + head, selected weights), ``config.yaml``, ``metrics.csv``.

``resume=auto`` continues from the newest complete epoch checkpoint in ``<output>/checkpoints``.

``task=segmentation`` (binary masks, e.g. ``data.dataset=drive:``) trains a :class:`medpretrain.segmentation.UNet`
whose encoder is the same backbone, on random paired patches (``seg.patch_size``) of ``seg.n_train_images``
annotated images; validation and test use MONAI's sliding-window inference over whole images and score
inside the roi (DRIVE's field of view). Model selection: best mean validation Dice. Outputs as above,
with per-image test metrics in ``results.json``, ``overlays.png``, and ``predictions.npz`` holding the test
probability maps as uint16 (0 outside the roi) with the masks, rois and image names
(:func:`medpretrain.segmentation.save_predictions`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medpretrain.backbones import build_backbone, resolve_stem  # noqa: E402
from medpretrain.checkpoint import load_exact, load_state_dict, save_state_dict  # noqa: E402
from medpretrain.config import (  # noqa: E402
    BackboneConfig,
    ConfigError,
    DataConfig,
    config_hash,
    config_to_dict,
    load_config,
    save_config,
)
from medpretrain.data import build_dataset, read_source  # noqa: E402
from medpretrain.distributed import check_world, cpu_group_needed  # noqa: E402
from medpretrain.metrics import (  # noqa: E402
    bootstrap_ci,
    classification_metrics,
    epochs_to_fraction_of_best,
    probabilities,
    roc_curves,
)
from medpretrain.regimes import Classifier, apply_regime, parse_regime  # noqa: E402
from medpretrain.training import (  # noqa: E402
    CSVLogger,
    FiniteGuard,
    load_checkpoint,
    prepare_resume,
    project_configuration,
    resolve_resume,
    save_checkpoint,
)
from medpretrain.utils import atomic_write_text, code_version, seed_everything  # noqa: E402

log = logging.getLogger("finetune")
EXIT_UNAVAILABLE = 3


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    """Head (and re-initialised stages) learning rate."""
    backbone_lr_mult: float = 0.1
    """Pre-trained backbone weights train at ``lr * backbone_lr_mult`` (ignored for ``init=scratch``)."""
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 256
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Step decay at these fractions of ``epochs`` (the MedMNIST v2 protocol)."""
    gamma: float = 0.1
    grad_clip: float = 0.0
    """Clip the gradient norm to this (0 = off)."""
    dropout: float = 0.0
    """Dropout before the linear head."""
    patience: int = 0
    """Early stopping: stop after this many epochs without a better validation AUC (0 = off)."""
    max_steps_per_epoch: int = 0
    """Smoke tests only: cap the optimizer steps per epoch (0 = the whole training split)."""


@dataclass
class SegConfig:
    """``task=segmentation`` only (binary masks, e.g. ``drive:``)."""

    n_train_images: int = 0
    """Label budget: this many annotated training images, drawn seeded (``seed``) from train (0 = all)."""
    patch_size: int = 96
    """Training patches (PairedRandomCrop + PairedRandomFlip) and the sliding-window size at inference."""
    patches_per_image: int = 16
    """Patches drawn per training image per epoch."""
    sw_batch_size: int = 16
    sw_overlap: float = 0.25
    threshold: float = 0.5
    dice_loss_weight: float = 1.0
    """Loss = BCE + this * soft Dice (vessels are ~12 % of the field of view; BCE alone predicts background)."""
    n_overlays: int = 3
    """Test images drawn in ``overlays.png`` (prediction against ground truth)."""


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    init: str = "scratch"
    """scratch | imagenet | selfsup | simclr | moco | vae | dcgan | <path to a backbone checkpoint>."""
    init_name: str = ""
    """Label of the init in folders and reports (default: ``init``; ``<run>-<file>`` for a path)."""
    weights: str | None = None
    """ImageNet weights file (``init=imagenet``); default: looked up by :mod:`medpretrain.init`."""
    runs_dir: str = "runs"
    task: Literal["classification", "segmentation"] = "classification"
    regime: str = "full"
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    output_dir: str | None = None
    """Default: ``<runs_dir>/finetune/<task>/<init>/<regime>/<fraction>/seed<seed>``."""
    n_bootstrap: int = 1000
    resume: str = ""
    """``auto``: continue from the newest complete epoch checkpoint of this output folder."""
    keep_checkpoints: bool = False
    """Keep the per-epoch resume checkpoints after a successful run (they are large)."""


def init_label(init: str, name: str = "") -> str:
    """Short name of an init for folders and reports: ``name`` if given, else the init (a checkpoint path
    becomes ``<parent folder>-<file stem>``)."""
    if name:
        return name
    p = Path(init)
    if p.suffix == ".safetensors" or "/" in init:
        return f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem
    return init


def run_hash(cfg: FinetuneConfig) -> str:
    """Hash of what a run computes: the config without the bookkeeping keys (``resume``, ``keep_checkpoints``).

    ``scripts/compare.py`` skips a run whose ``results.json`` carries the same hash.
    """
    return config_hash(dataclasses.replace(cfg, resume="", keep_checkpoints=False))


def output_dir(cfg: FinetuneConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    frac = cfg.data.label_fraction if cfg.data.label_fraction is not None else 1.0
    budget = f"n{cfg.seg.n_train_images or 'all'}" if cfg.task == "segmentation" else f"{frac:g}"
    return (Path(cfg.runs_dir) / "finetune" / cfg.task / init_label(cfg.init, cfg.init_name)
            / cfg.regime.replace(":", "-") / budget / f"seed{cfg.seed}")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=2, allow_nan=True))


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------


class InitUnavailable(RuntimeError):
    """The requested initialisation does not exist here (ImageNet weights missing, no pretraining export)."""


def build_init(cfg: FinetuneConfig, in_channels: int, stem: str, image_size: int) -> tuple[torch.nn.Module, Any]:
    """Backbone from :func:`medpretrain.init.init_backbone`; a missing init raises :class:`InitUnavailable`.

    ``ImageNetUnavailable`` is a ``FileNotFoundError``, as is a missing pretraining export: neither ever
    falls back to random weights.
    """
    from medpretrain.backbones import torchvision_archs
    from medpretrain.init import init_backbone

    if cfg.init == "imagenet" and cfg.backbone.arch not in torchvision_archs():
        raise InitUnavailable(f"ImageNet weights do not exist for {cfg.backbone.arch!r} (only for "
                              f"{torchvision_archs()})")
    try:
        return init_backbone(cfg.init, cfg.backbone.arch, in_channels, stem, image_size=image_size,
                             weights=cfg.weights, runs_dir=cfg.runs_dir)
    except FileNotFoundError as e:
        raise InitUnavailable(str(e)) from e


def reconcile_with_init(cfg: FinetuneConfig, info: Any, accelerator: Accelerator, image_size: int) -> list[str]:
    """Use the init checkpoint's input normalisation / size / channels (warn where the config differs).

    ``image_size`` is the size the data has under the current config (``data.image_size`` or the source's).
    """
    meta = getattr(info, "meta", None)
    if meta is None:
        return []
    warnings = []
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("image_size", "image_size"), ("channels", "in_channels")):
        value = getattr(meta, theirs, None)
        if value is None or isinstance(value, list):
            if isinstance(value, list) and len(set(value)) == 1:
                value = value[0]
            else:
                continue
        current = getattr(cfg.data, ours)
        if ours == "image_size" and current is None and value == image_size:
            continue
        if current != value:
            warnings.append(f"data.{ours}={getattr(cfg.data, ours)!r} differs from the init checkpoint's "
                            f"{theirs}={value!r}; using the checkpoint's")
            setattr(cfg.data, ours, value)
    for w in warnings:
        accelerator.print(f"warning: {w}")
    return warnings


def build_dataloaders(cfg: FinetuneConfig) -> dict[str, Any]:
    ds = {split: build_dataset(cfg.data, split) for split in ("train", "val", "test")}
    g = torch.Generator().manual_seed(cfg.seed)
    loaders = {
        "train": DataLoader(ds["train"], batch_size=cfg.optim.batch_size, shuffle=True, generator=g,
                            num_workers=cfg.data.num_workers, drop_last=len(ds["train"]) > cfg.optim.batch_size),
        "val": DataLoader(ds["val"], batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.num_workers),
        "test": DataLoader(ds["test"], batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.num_workers),
    }
    return {"datasets": ds, "loaders": loaders}


def loss_fn(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)  # binary heads have two logits (the MedMNIST convention)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, task: str, accelerator: Accelerator) -> dict[str, np.ndarray]:
    """Probabilities, labels and dataset indices over a whole split, gathered across processes."""
    model.eval()
    probs, labels, index = [], [], []
    for batch in loader:
        p = probabilities(model(batch["image"]), task)
        p, y, i = accelerator.gather_for_metrics((p, batch["label"], batch["index"]))
        probs.append(p.float().cpu())
        labels.append(y.cpu())
        index.append(i.cpu())
    return {"probs": torch.cat(probs).numpy(), "labels": torch.cat(labels).numpy(), "index": torch.cat(index).numpy()}


class Progress:
    """Epoch counter, best validation AUC and history: checkpointed with the model (resume)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.best_auc = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.__dict__)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(json.loads(state["json"]))

    def record(self, row: dict[str, Any], val: dict[str, float], score: float, patience: int) -> tuple[bool, bool]:
        """Add epoch ``row["epoch"]`` with its validation metrics; ``score`` is the selection score (validation
        AUC, or Dice for segmentation; ``best_auc`` holds it). Returns (improved, stop early)."""
        self.history.append({**row, "val": val})
        self.epoch = row["epoch"]
        improved = math.isfinite(score) and score > self.best_auc
        if improved:
            self.best_auc, self.best_epoch, self.bad_epochs = score, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved, bool(patience) and self.bad_epochs >= patience


def build_optimizer(model: torch.nn.Module, regime: Any, cfg: FinetuneConfig,
                    stem: str) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR, Any]:
    """``apply_regime`` on ``model.backbone`` (``reinit`` draws a scratch backbone seeded ``seed + 1``), the
    ``optim.optimizer`` over its parameter groups, and the step decay at ``optim.milestones``.

    The scheduler is stepped once per epoch and not passed to ``prepare()`` (accelerate steps prepared
    schedulers once per process per call, which suits per-batch schedules only); it is checkpointed by
    ``save_checkpoint(state=...)``. Returns ``(optimizer, scheduler, regime_info)``.
    """
    torch.manual_seed(cfg.seed + 1)  # the re-init weights: a scratch backbone of the same architecture
    fresh = build_backbone(cfg.backbone.arch, cfg.data.channels, stem) if regime.kind == "reinit" else None
    groups, regime_info = apply_regime(
        model, regime, lr=cfg.optim.lr, backbone_lr_mult=cfg.optim.backbone_lr_mult,  # type: ignore[arg-type]
        weight_decay=cfg.optim.weight_decay, pretrained=cfg.init != "scratch", fresh_backbone=fresh,
    )
    optimizer: torch.optim.Optimizer
    if cfg.optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    elif cfg.optim.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    else:
        optimizer = torch.optim.Adam(groups, lr=cfg.optim.lr)
    milestones = sorted({max(1, int(m * cfg.optim.epochs)) for m in cfg.optim.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.optim.gamma)
    return optimizer, scheduler, regime_info


# ------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------


def run_classification(cfg: FinetuneConfig, accelerator: Accelerator, out: Path, requested_hash: str) -> dict[str, Any]:
    t_run = time.perf_counter()
    regime = parse_regime(cfg.regime)
    seed_everything(cfg.seed)

    source = read_source(cfg.data)
    image_size = cfg.data.image_size or int(np.asarray(source.images[0]).shape[-1])
    stem = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch)
    backbone, info = build_init(cfg, cfg.data.channels, stem, image_size)
    stem = str(getattr(backbone, "stem", stem))  # a loaded export keeps its own stem
    init_warnings = reconcile_with_init(cfg, info, accelerator, image_size)
    image_size = cfg.data.image_size or image_size
    if init_warnings and accelerator.is_main_process:
        save_config(cfg, out)  # the config actually used, with the checkpoint's data options

    parts = build_dataloaders(cfg)
    train_ds = parts["datasets"]["train"]
    task = train_ds.task
    if task not in ("binary", "multiclass", "multilabel"):
        raise ConfigError(f"task=classification needs a labelled classification dataset, got task {task!r}")
    num_outputs = 2 if task == "binary" else train_ds.num_classes

    model = Classifier(backbone, num_outputs, dropout=cfg.optim.dropout)
    optimizer, scheduler, regime_info = build_optimizer(model, regime, cfg, stem)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, parts["loaders"]["train"], parts["loaders"]["val"], parts["loaders"]["test"]
    )
    progress = Progress()
    ckpt_state = {"scheduler": scheduler, "progress": progress}  # saved without pickle (save_checkpoint)

    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(cfg.resume, ckpt_dir)
    if resume_from is None and accelerator.is_main_process:
        (out / "metrics.csv").unlink(missing_ok=True)  # a fresh run starts a fresh log
    csv_log = CSVLogger(out / "metrics.csv", ["epoch", "train_loss", "val_auc", "val_accuracy", "lr", "epoch_s"])
    prepare_resume(accelerator, ckpt_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, ckpt_state)
        csv_log.truncate_after(progress.epoch, key="epoch")
        accelerator.print(f"resumed from {resume_from} after epoch {progress.epoch}")
    guard = FiniteGuard(accelerator.device)
    best_path = out / "best_model.safetensors"
    unwrapped = accelerator.unwrap_model(model)

    accelerator.print(
        f"{cfg.init} / {regime} / labels {cfg.data.label_fraction or 1.0:g} ({len(train_ds)} train) / seed "
        f"{cfg.seed}: {task}, {num_outputs} outputs, {regime_info.trainable_params} trainable params"
    )
    step = 0
    for epoch in range(progress.epoch + 1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        total, count = torch.zeros((), device=accelerator.device), 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not accelerator.is_local_main_process)
        for i, batch in enumerate(bar):
            if cfg.optim.max_steps_per_epoch and i >= cfg.optim.max_steps_per_epoch:
                break
            with accelerator.accumulate(model):
                loss = loss_fn(model(batch["image"]), batch["label"], task)
                guard.update(loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            total += loss.detach() * len(batch["label"])
            count += len(batch["label"])
        scheduler.step()
        guard.check(resume_from, reduce=lambda t: accelerator.gather(t).max())
        train_loss = float(accelerator.gather(total.reshape(1)).sum()) / max(1, count * accelerator.num_processes)

        val = predict(model, val_loader, task, accelerator)
        val_m = classification_metrics(val["probs"], val["labels"], task)
        epoch_s = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": train_loss, "val_auc": val_m["auc"], "val_accuracy": val_m["accuracy"],
               "lr": lr, "epoch_s": epoch_s}
        improved, stop = progress.record(row, val_m, val_m["auc"], cfg.optim.patience)
        if improved and accelerator.is_main_process:
            save_state_dict(best_path, unwrapped.state_dict(), {"epoch": epoch, "val_auc": val_m["auc"]})
        if accelerator.is_main_process:
            csv_log.log(row)
        accelerator.print(f"epoch {epoch}/{cfg.optim.epochs} loss {train_loss:.4f} val AUC {val_m['auc']:.4f} "
                          f"ACC {val_m['accuracy']:.4f} lr {lr:.1e} {epoch_s:.1f}s" + (" *" if improved else ""))
        accelerator.wait_for_everyone()
        resume_from = save_checkpoint(accelerator, step=epoch, state=ckpt_state)
        if stop:
            accelerator.print(f"early stopping: no better validation AUC for {cfg.optim.patience} epochs")
            break

    # Model selection is over: load the best-validation weights and touch the test split once.
    if not best_path.exists():
        raise RuntimeError(f"{best_path} is missing: no epoch produced a finite validation AUC (or the file was "
                           "removed after a finished run; resume needs keep_checkpoints=true)")
    state, _ = load_state_dict(best_path)
    load_exact(unwrapped, state, source=best_path)
    test = predict(model, test_loader, task, accelerator)
    test_m = classification_metrics(test["probs"], test["labels"], task)
    test_ds = parts["datasets"]["test"]
    ci = bootstrap_ci(test["probs"], test["labels"], task, n_boot=cfg.n_bootstrap, seed=cfg.seed)
    roc = roc_curves(test["probs"], test["labels"], task, class_names=test_ds.class_names)
    val_best = progress.history[progress.best_epoch - 1]["val"]
    aucs = [h["val_auc"] for h in progress.history]

    results: dict[str, Any] = {
        "status": "complete",
        "task": cfg.task,
        "label_task": task,
        "init": cfg.init,
        "init_label": init_label(cfg.init, cfg.init_name),
        "init_info": info,
        "init_warnings": init_warnings,
        "regime": str(regime),
        "regime_info": regime_info,
        "label_fraction": cfg.data.label_fraction if cfg.data.label_fraction is not None else 1.0,
        "seed": cfg.seed,
        "metrics": {"test": test_m, "val_best": val_best},
        "ci": ci,
        "ci_method": f"percentile bootstrap over test cases, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
        "roc": roc,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "epochs_to_95": epochs_to_fraction_of_best(aucs, 0.95),
        "history": [{k: v for k, v in h.items() if k != "val"} for h in progress.history],
        "timing": {"mean_epoch_s": float(np.mean([h["epoch_s"] for h in progress.history])),
                   "total_s": time.perf_counter() - t_run, "processes": accelerator.num_processes,
                   "device": str(accelerator.device)},
        "data": {"dataset": cfg.data.dataset, "fingerprint": train_ds.fingerprint, "train_size": len(train_ds),
                 "val_size": len(parts["datasets"]["val"]), "test_size": len(test_ds),
                 "class_names": train_ds.class_names,
                 "train_class_counts": np.bincount(train_ds.labels, minlength=num_outputs).tolist()
                 if task != "multilabel" else np.asarray(train_ds.labels).sum(0).tolist()},
        "config": config_to_dict(cfg),
        "config_hash": requested_hash,
        "resolved_config_hash": run_hash(cfg),
        "code_version": code_version(),
        "torch": torch.__version__,
        "run_dir": str(out),
    }
    if accelerator.is_main_process:
        save_state_dict(out / "model.safetensors", unwrapped.state_dict(),
                        {"config": config_to_dict(cfg), "task": task, "class_names": train_ds.class_names,
                         "arch": cfg.backbone.arch, "stem": stem, "in_channels": cfg.data.channels,
                         "mean": cfg.data.mean, "std": cfg.data.std, "image_size": image_size,
                         "best_epoch": progress.best_epoch, "init": cfg.init})
        np.savez(out / "predictions.npz", test_probs=test["probs"], test_labels=test["labels"],
                 test_index=test["index"])
        write_results(out, results)
        if not cfg.keep_checkpoints:  # the best-epoch weights belong to the resume state
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            best_path.unlink(missing_ok=True)
    accelerator.print(
        f"test ({len(test_ds)}): " + " ".join(f"{k} {v:.4f}" for k, v in test_m.items())
        + f" | AUC 95% CI [{ci['auc']['low']:.4f}, {ci['auc']['high']:.4f}] | best epoch {progress.best_epoch}"
    )
    return results


# ------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------


def build_seg_dataloaders(cfg: FinetuneConfig) -> dict[str, Any]:
    """Patch loader over ``seg.n_train_images`` seeded training images; whole-image val / test loaders."""
    from torch.utils.data import Subset

    from medpretrain.data.transforms import Compose, PairedRandomCrop, PairedRandomFlip

    patches = Compose([PairedRandomCrop(cfg.seg.patch_size), PairedRandomFlip()])
    full_train = build_dataset(cfg.data, "train", transform=patches)
    n_all = len(full_train)
    n = cfg.seg.n_train_images or n_all
    if not 1 <= n <= n_all:
        raise ConfigError(f"seg.n_train_images={cfg.seg.n_train_images} but the training split has {n_all} images")
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(n_all)[:n])
    # Each chosen image appears patches_per_image times per epoch, each time with a fresh random crop.
    train = Subset(full_train, np.repeat(chosen, cfg.seg.patches_per_image).tolist())
    ds = {"train": full_train, "val": build_dataset(cfg.data, "val"), "test": build_dataset(cfg.data, "test")}
    g = torch.Generator().manual_seed(cfg.seed)
    loaders = {
        "train": DataLoader(train, batch_size=cfg.optim.batch_size, shuffle=True, generator=g,
                            num_workers=cfg.data.num_workers, drop_last=len(train) > cfg.optim.batch_size),
        "val": DataLoader(ds["val"], batch_size=1, num_workers=cfg.data.num_workers),
        "test": DataLoader(ds["test"], batch_size=1, num_workers=cfg.data.num_workers),
    }
    return {"datasets": ds, "loaders": loaders, "chosen": chosen,
            "chosen_names": [full_train.names[int(i)] for i in chosen] if full_train.names is not None else None}


def seg_loss(logits: torch.Tensor, mask: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE + ``dice_weight`` * soft Dice (batch-pooled, smoothed by 1)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    if dice_weight <= 0:
        return bce
    p = torch.sigmoid(logits)
    dice = (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    return bce + dice_weight * (1 - dice)


@torch.no_grad()
def predict_images(model: torch.nn.Module, loader: DataLoader, cfg: FinetuneConfig,
                   accelerator: Accelerator) -> dict[str, np.ndarray]:
    """Foreground probabilities of whole images by MONAI sliding-window inference, gathered across processes.

    Returns ``probs``, ``masks``, ``rois`` ``[N, H, W]`` and ``index`` ``[N]`` (images of one split share a size).
    """
    from monai.inferers import sliding_window_inference

    model.eval()
    probs, masks, rois, index = [], [], [], []
    size = (cfg.seg.patch_size, cfg.seg.patch_size)
    for batch in loader:
        logits = sliding_window_inference(batch["image"], size, cfg.seg.sw_batch_size, model,
                                          overlap=cfg.seg.sw_overlap, mode="gaussian")
        p = torch.sigmoid(torch.as_tensor(logits))[:, 0]
        p, m, r, i = accelerator.gather_for_metrics((p, batch["mask"][:, 0], batch["roi"][:, 0], batch["index"]))
        probs.append(p.float().cpu())
        masks.append(m.cpu())
        rois.append(r.cpu())
        index.append(i.cpu())
    return {"probs": torch.cat(probs).numpy(), "masks": torch.cat(masks).numpy(), "rois": torch.cat(rois).numpy(),
            "index": torch.cat(index).numpy()}


def save_overlays(path: Path, pred: dict[str, np.ndarray], dataset: Any, n: int, threshold: float) -> None:
    """PNG: for ``n`` test images, the image and the prediction against ground truth inside the roi
    (green true positive, red false positive, blue false negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(pred["probs"]))
    fig, axes = plt.subplots(n, 2, figsize=(8, 4 * n), squeeze=False)
    for row in range(n):
        image = dataset[row]["image"].numpy()
        grey = image.mean(0)
        grey = (grey - grey.min()) / max(1e-8, float(grey.max() - grey.min()))
        roi = pred["rois"][row] > 0.5
        yhat = (pred["probs"][row] >= threshold) & roi
        gt = (pred["masks"][row] > 0.5) & roi
        rgb = np.zeros((*gt.shape, 3), dtype=np.float32)
        rgb[yhat & gt] = (0.0, 0.8, 0.0)
        rgb[yhat & ~gt] = (0.9, 0.1, 0.1)
        rgb[~yhat & gt] = (0.2, 0.4, 1.0)
        name = dataset.names[row] if dataset.names is not None else str(row)
        axes[row, 0].imshow(grey, cmap="gray")
        axes[row, 0].set_title(name)
        axes[row, 1].imshow(rgb)
        axes[row, 1].set_title("TP green, FP red, FN blue")
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_segmentation(cfg: FinetuneConfig, accelerator: Accelerator, out: Path, requested_hash: str) -> dict[str, Any]:
    from medpretrain.metrics import bootstrap_images, mean_metrics, per_image_metrics
    from medpretrain.results import save_predictions
    from medpretrain.unet import UNet
    from medpretrain.training import fault_hook

    t_run = time.perf_counter()
    regime = parse_regime(cfg.regime)
    seed_everything(cfg.seed)
    source = read_source(cfg.data)
    image_size = cfg.data.image_size or int(np.asarray(source.images[0]).shape[-1])
    # The encoder sees patches: an ``auto`` stem follows the patch size, not the whole-image size; a loaded
    # checkpoint keeps its own stem.
    backbone, info = build_init(cfg, cfg.data.channels, cfg.backbone.stem, cfg.seg.patch_size)
    stem = str(backbone.stem)
    meta = getattr(info, "meta", None)
    init_warnings = []
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("channels", "in_channels")):
        value = getattr(meta, theirs, None) if meta is not None else None
        if isinstance(value, list):
            value = value[0] if len(set(value)) == 1 else None
        if value is not None and getattr(cfg.data, ours) != value:
            init_warnings.append(f"data.{ours}={getattr(cfg.data, ours)!r} differs from the init checkpoint's "
                                 f"{theirs}={value!r}; using the checkpoint's")
            setattr(cfg.data, ours, value)
    for w in init_warnings:
        accelerator.print(f"warning: {w}")
    if init_warnings and accelerator.is_main_process:
        save_config(cfg, out)

    parts = build_seg_dataloaders(cfg)
    train_ds, val_ds, test_ds = (parts["datasets"][s] for s in ("train", "val", "test"))
    if train_ds.task != "segmentation":
        raise ConfigError(f"task=segmentation needs a mask dataset (e.g. drive:), got task {train_ds.task!r}")

    model = UNet(backbone, num_classes=1)
    # The regimes act on model.backbone (= the U-Net encoder); the decoder always trains at optim.lr.
    optimizer, scheduler, regime_info = build_optimizer(model, regime, cfg, stem)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, parts["loaders"]["train"], parts["loaders"]["val"], parts["loaders"]["test"]
    )
    progress = Progress()
    ckpt_state = {"scheduler": scheduler, "progress": progress}  # saved without pickle (save_checkpoint)
    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(cfg.resume, ckpt_dir)
    if resume_from is None and accelerator.is_main_process:
        (out / "metrics.csv").unlink(missing_ok=True)
    csv_log = CSVLogger(out / "metrics.csv", ["epoch", "train_loss", "val_dice", "val_auc", "lr", "epoch_s"])
    prepare_resume(accelerator, ckpt_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, ckpt_state)
        csv_log.truncate_after(progress.epoch, key="epoch")
        accelerator.print(f"resumed from {resume_from} after epoch {progress.epoch}")
    guard = FiniteGuard(accelerator.device)
    best_path = out / "best_model.safetensors"
    unwrapped = accelerator.unwrap_model(model)
    n_images = len(parts["chosen"])
    accelerator.print(f"{cfg.init} / {regime} / {n_images} annotated images / seed {cfg.seed}: segmentation, "
                      f"{cfg.seg.patch_size}px patches, {regime_info.trainable_params} trainable params")

    def scores(pred: dict[str, np.ndarray]) -> list[dict[str, float]]:
        return per_image_metrics(pred["probs"], pred["masks"], pred["rois"], threshold=cfg.seg.threshold,
                                 seed=cfg.seed)

    # Global step count (fault hook, results): a resumed run continues from the steps of its finished epochs.
    steps_per_epoch = min(len(train_loader), cfg.optim.max_steps_per_epoch or len(train_loader))
    step = progress.epoch * steps_per_epoch
    for epoch in range(progress.epoch + 1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        total, count = torch.zeros((), device=accelerator.device), 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not accelerator.is_local_main_process)
        for i, batch in enumerate(bar):
            if cfg.optim.max_steps_per_epoch and i >= cfg.optim.max_steps_per_epoch:
                break
            with accelerator.accumulate(model):
                loss = seg_loss(model(batch["image"]), batch["mask"], cfg.seg.dice_loss_weight)
                guard.update(loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            fault_hook(step)  # test-only: MEDPRETRAIN_FAULT_EXIT_AT_STEP kills the run mid-epoch
            total += loss.detach() * len(batch["mask"])
            count += len(batch["mask"])
        scheduler.step()
        guard.check(resume_from, reduce=lambda t: accelerator.gather(t).max())
        train_loss = float(accelerator.gather(total.reshape(1)).sum()) / max(1, count * accelerator.num_processes)

        val_m = mean_metrics(scores(predict_images(model, val_loader, cfg, accelerator)))
        epoch_s = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": train_loss, "val_dice": val_m["dice"], "val_auc": val_m["auc"],
               "lr": lr, "epoch_s": epoch_s}
        improved, stop = progress.record(row, val_m, val_m["dice"], cfg.optim.patience)  # selection: val Dice
        if improved and accelerator.is_main_process:
            save_state_dict(best_path, unwrapped.state_dict(), {"epoch": epoch, "val_dice": val_m["dice"]})
        if accelerator.is_main_process:
            csv_log.log(row)
        accelerator.print(f"epoch {epoch}/{cfg.optim.epochs} loss {train_loss:.4f} val Dice {val_m['dice']:.4f} "
                          f"AUC {val_m['auc']:.4f} lr {lr:.1e} {epoch_s:.1f}s" + (" *" if improved else ""))
        accelerator.wait_for_everyone()
        resume_from = save_checkpoint(accelerator, step=epoch, state=ckpt_state)
        if stop:
            accelerator.print(f"early stopping: no better validation Dice for {cfg.optim.patience} epochs")
            break

    if not best_path.exists():
        raise RuntimeError(f"{best_path} is missing: no epoch produced a finite validation Dice (or the file was "
                           "removed after a finished run; resume needs keep_checkpoints=true)")
    state, _ = load_state_dict(best_path)
    load_exact(unwrapped, state, source=best_path)
    test = predict_images(model, test_loader, cfg, accelerator)
    rows = scores(test)
    test_m = mean_metrics(rows)
    ci = bootstrap_images(rows, n_boot=cfg.n_bootstrap, seed=cfg.seed)
    dices = [h["val_dice"] for h in progress.history]
    names = test_ds.names
    results: dict[str, Any] = {
        "status": "complete",
        "task": cfg.task,
        "label_task": "segmentation",
        "init": cfg.init,
        "init_label": init_label(cfg.init, cfg.init_name),
        "init_info": info,
        "init_warnings": init_warnings,
        "regime": str(regime),
        "regime_info": regime_info,
        "label_fraction": n_images / len(train_ds),
        "n_train_images": n_images,
        "seed": cfg.seed,
        "metrics": {"test": test_m, "val_best": progress.history[progress.best_epoch - 1]["val"]},
        "per_image": [{"name": names[int(i)] if names is not None else int(i), **r}
                      for i, r in zip(test["index"], rows, strict=True)],
        "ci": ci,
        "ci_method": f"percentile bootstrap over test images, n={cfg.n_bootstrap}, seed={cfg.seed}, 95%",
        "metric_protocol": f"per-image pixel metrics inside the roi (threshold {cfg.seg.threshold}), mean over "
                           "test images; pixel AUC on at most 200000 roi pixels per image",
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "optimizer_steps": step,
        "epochs_to_95": epochs_to_fraction_of_best(dices, 0.95),
        "history": [{k: v for k, v in h.items() if k != "val"} for h in progress.history],
        "timing": {"mean_epoch_s": float(np.mean([h["epoch_s"] for h in progress.history])),
                   "total_s": time.perf_counter() - t_run, "processes": accelerator.num_processes,
                   "device": str(accelerator.device)},
        "data": {"dataset": cfg.data.dataset, "fingerprint": train_ds.fingerprint, "train_size": n_images,
                 "train_pool_size": len(train_ds), "train_images": parts["chosen_names"],
                 "val_size": len(val_ds), "test_size": len(test_ds), "image_size": image_size,
                 "patch_size": cfg.seg.patch_size},
        "config": config_to_dict(cfg),
        "config_hash": requested_hash,
        "resolved_config_hash": run_hash(cfg),
        "code_version": code_version(),
        "torch": torch.__version__,
        "run_dir": str(out),
    }
    if accelerator.is_main_process:
        save_state_dict(out / "model.safetensors", unwrapped.state_dict(),
                        {"config": config_to_dict(cfg), "task": "segmentation", "arch": cfg.backbone.arch,
                         "stem": stem, "in_channels": cfg.data.channels, "mean": cfg.data.mean, "std": cfg.data.std,
                         "patch_size": cfg.seg.patch_size, "best_epoch": progress.best_epoch, "init": cfg.init})
        save_overlays(out / "overlays.png", test, test_ds, cfg.seg.n_overlays, cfg.seg.threshold)
        # uint16 probabilities (0 outside the roi), masks, rois and image names: scripts/compare.py ensembles them.
        save_predictions(out / "predictions.npz", test["probs"], test["masks"], test["rois"], test["index"],
                         [names[int(i)] for i in test["index"]] if names is not None else None)
        write_results(out, results)
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            best_path.unlink(missing_ok=True)
    accelerator.print(
        f"test ({len(test_ds)} images): " + " ".join(f"{k} {v:.4f}" for k, v in test_m.items())
        + f" | Dice 95% CI [{ci['dice']['low']:.4f}, {ci['dice']['high']:.4f}] | best epoch {progress.best_epoch}"
    )
    return results


TASKS = {"classification": run_classification, "segmentation": run_segmentation}


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(FinetuneConfig, argv)
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not implemented; available: {sorted(TASKS)}")
    parse_regime(cfg.regime)  # fail on a bad regime before any work
    # Bad data fails here, before the run folder is touched (config.yaml of an earlier run stays); decoded
    # once per process: the task functions below get it from the cache.
    source = read_source(cfg.data)
    if cfg.task == "segmentation" and source.task != "segmentation":
        raise ConfigError(f"task=segmentation needs a mask dataset (e.g. data.dataset=drive:drive), "
                          f"{cfg.data.dataset!r} is not one")
    out = output_dir(cfg)
    requested_hash = run_hash(cfg)  # before the init checkpoint may adjust data options
    accelerator = Accelerator(
        cpu=cpu_group_needed(),
        project_config=project_configuration(out, total_limit=2),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_world(accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    try:
        TASKS[cfg.task](cfg, accelerator, out, requested_hash)
    except InitUnavailable as e:
        # ImageNetUnavailable, or no pretraining export yet: the arm is reported as unavailable and is
        # never run with random weights instead.
        if accelerator.is_main_process:
            write_results(out, {
                "status": "unavailable", "reason": str(e), "task": cfg.task, "init": cfg.init,
                "init_label": init_label(cfg.init, cfg.init_name), "regime": cfg.regime, "seed": cfg.seed,
                "label_fraction": cfg.data.label_fraction if cfg.data.label_fraction is not None else 1.0,
                "n_train_images": cfg.seg.n_train_images if cfg.task == "segmentation" else None,
                "config": config_to_dict(cfg), "config_hash": requested_hash, "code_version": code_version(),
            })
        accelerator.print(f"init '{cfg.init}' is unavailable: {e}\nwrote {out / 'results.json'} with status "
                          "'unavailable'; this arm is not run with random weights.")
        accelerator.end_training()
        return EXIT_UNAVAILABLE
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
