"""Fine-tuning parts shared by classification and segmentation (``finetune/run.py`` wires them).

* :class:`FinetuneConfig` (with :class:`OptimConfig`, :class:`SegConfig`): one run's typed config;
  :func:`output_dir`, :func:`run_hash` and :func:`init_label` name its folder, its hash and its init,
  so the experiment pipeline plans runs without importing the script;
* :func:`build_encoder`: the init backbone (:func:`medpretrain.init.init_backbone`; a missing init raises
  :class:`InitUnavailable`, never random weights) with the checkpoint's data options taken over
  (:func:`reconcile_with_init`);
* :func:`build_optimizer`: regime, optimizer and LR schedule (:func:`build_scheduler`: step decay or cosine,
  in optimiser steps under a step budget); :class:`Budget` / :func:`budget_of`: the optimiser steps of a run
  (``optim.steps``: the same for every label fraction, drawn by :class:`StepBatches`) and its validation
  periods; :class:`Progress`: period, best validation score and history, checkpointed without pickle;
* the two tasks' data, losses and predictions: :func:`build_dataloaders` (with ``data.synthetic``'s images
  added to the training split, :mod:`medpretrain.data.synthetic`; :func:`check_synthetic`) /
  :func:`classification_loss` / :func:`predict` (labels), :func:`build_seg_dataloaders` / :func:`seg_loss` / :func:`predict_images`
  (masks, sliding-window inference), :func:`save_overlays`;
* :class:`TaskParts`: what a task hands the one training loop of the script;
* :func:`complete_result`, :func:`unavailable_result`, :func:`failed_result`: the run's
  :class:`~medpretrain.results.RunResult` for each status.

Nothing here prints; the script prints through ``accelerator.print``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medpretrain.backbones import build_backbone, resolve_stem
from medpretrain.config import BackboneConfig, ConfigError, DataConfig, config_hash, config_to_dict
from medpretrain.data import build_dataset, synthetic
from medpretrain.data.loader import balanced_weights
from medpretrain.metrics import epochs_to_fraction_of_best, metric_names, probabilities
from medpretrain.multitask import MultiTask, TaskSpec, check_tasks, tasks_label
from medpretrain.regimes import apply_regime
from medpretrain.results import RunResult, headline_metric, jsonable
from medpretrain.schedules import fused
from medpretrain.utils import PROJECT_ROOT, code_version

EXIT_UNAVAILABLE = 3
"""Exit status of ``finetune/run.py`` when the init does not exist here (``results.json`` says ``unavailable``)."""
SCRIPT = PROJECT_ROOT / "finetune" / "run.py"


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    """Head (and re-initialised stages) learning rate."""
    backbone_lr_mult: float = 1.0
    """Backbone weights kept from the init train at ``lr * backbone_lr_mult``, for every init alike (scratch
    included): the same hyper-parameters for every init, so no init is favoured by its learning rate."""
    weight_decay: float = 0.0
    momentum: float = 0.9
    steps: int = 0
    """Budget in optimiser steps (> 0): every label fraction gets exactly this many steps, the loader cycling
    over the budget's training images in seeded passes (:class:`StepBatches`); the epochs follow from it.
    0: ``epochs`` passes over the training images (the older protocol: small fractions get fewer steps)."""
    eval_every: int = 0
    """With ``steps``: validate, keep the best checkpoint and write a resume checkpoint every this many steps
    (0: ten times over the budget)."""
    epochs: int = 20
    """Passes over the training images when ``steps`` is 0."""
    batch_size: int = 128
    eval_batch_size: int = 256
    schedule: Literal["step", "cosine"] = "step"
    """``step``: decay by ``gamma`` at ``milestones``; ``cosine``: cosine annealing from ``lr`` to 0."""
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Step decay at these fractions of ``steps`` (of ``epochs`` when ``steps`` is 0; the MedMNIST v2 protocol)."""
    gamma: float = 0.1
    grad_clip: float = 0.0
    """Clip the gradient norm to this (0 = off)."""
    dropout: float = 0.0
    """Dropout before the linear head."""
    patience: int = 0
    """Early stopping: stop after this many validations without a better validation AUC (0 = off)."""
    max_steps_per_epoch: int = 0
    """Smoke tests only, ``steps`` = 0: cap the optimizer steps per epoch (0 = the whole training split)."""
    augment: Literal["none", "light", "strong"] = "none"
    """Training augmentation on whole batches on the device, the same for every init
    (:class:`medpretrain.augment.TrainAugment`; segmentation: the same geometry for image and mask)."""
    class_balance: bool = False
    """Single-label classification under a step budget: every pass of :class:`StepBatches` draws the budget's
    training images with every class equally likely (with replacement, seeded by the run's seed and the pass), so
    a 10%-normal training split trains on about as many normal as pneumonia images; validation and test are
    untouched, and the operating point is still chosen on validation. Off: each pass is a permutation."""

    def __post_init__(self) -> None:
        from medpretrain.config import ConfigError

        if self.class_balance and self.steps == 0:
            raise ConfigError("optim.class_balance=true needs a step budget (optim.steps > 0)")
        if self.steps < 0 or self.eval_every < 0:
            raise ConfigError(f"optim.steps and optim.eval_every must be >= 0, got {self.steps} and {self.eval_every}")
        if self.steps == 0 and self.epochs < 1:
            raise ConfigError(f"optim.epochs must be >= 1 when optim.steps is 0, got {self.epochs}")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ConfigError(f"optim.milestones are fractions of the budget in (0, 1], got {self.milestones}")


@dataclass
class EvalConfig:
    """How test metrics that need a decision are computed (classification)."""

    threshold: str = "youden"
    """Decision threshold of sensitivity, specificity, precision, F1 and accuracy, chosen on validation (with
    the selected checkpoint) and applied to test: ``youden`` (Youden's J), ``sensitivity:<x>`` /
    ``specificity:<x>`` (the threshold reaching that target on validation) or a fixed number such as ``0.5``.
    Binary: one threshold; multi-label: one per label; multi-class: the arg-max (no threshold)."""
    reuse_images: int = 64
    """Validation images of the feature-reuse analysis (:mod:`medpretrain.transfer`: per-stage weight change
    and CKA before vs after fine-tuning, the ``transfer`` field of ``results.json``) of trained regimes;
    segmentation: their centre ``seg.patch_size`` crops. 0: off. It reads the model only: metrics do not change."""

    def __post_init__(self) -> None:
        from medpretrain.config import ConfigError
        from medpretrain.metrics import parse_threshold_rule

        if self.reuse_images < 0:
            raise ConfigError(f"eval.reuse_images must be >= 0, got {self.reuse_images}")

        try:
            parse_threshold_rule(self.threshold)
        except ValueError as e:
            raise ConfigError(f"eval.threshold: {e}") from None


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
    sw_size: int = 0
    """Sliding-window size at inference (0: ``patch_size``). A fully convolutional U-Net runs at any size: a window
    larger than the training patches leaves fewer window borders in every prediction."""
    tta: Literal["none", "flips"] = "none"
    """Test-time augmentation of every prediction (validation and test alike, so the threshold chosen on validation
    fits test): ``flips`` averages the foreground probabilities of the image and its horizontal, vertical and
    double flips, each flipped back (4x the inference cost)."""
    threshold: float = 0.5
    """Binarisation threshold of the per-period validation Dice (model selection), and of test with
    ``threshold_rule=fixed``."""
    threshold_rule: Literal["dice", "fixed"] = "dice"
    """``dice``: the test threshold is the one in 0.05..0.95 that maximises the mean validation Dice of the
    selected checkpoint (:func:`medpretrain.metrics.dice_threshold`); ``fixed``: ``threshold``."""
    dice_loss_weight: float = 1.0
    """Loss = BCE + this * soft Dice (vessels are ~12 % of the field of view; BCE alone predicts background)."""
    n_overlays: int = 3
    """Test images drawn in ``overlays.png`` (prediction against ground truth)."""
    model: Literal["unet", "small"] = "unet"
    """``unet``: :class:`medpretrain.unet.UNet` with the init backbone as its encoder; ``small``:
    :func:`medpretrain.unet.small_unet`, a 69 k-parameter U-Net from scratch (``init=scratch``; the baseline arm
    that says whether transfer beats a tiny purpose-built network; ``backbone.*`` is then unused)."""
    full_resolution: bool = False
    """``unet``: a decoder level at the input's resolution for encoders whose finest map is coarser (ResNet's
    standard stem, timm encoders: stride 2); off, the head's stride-2 output is upsampled bilinearly."""
    foreground_fraction: float = 0.0
    """Vessel-weighted patches: this fraction of the training patches is centred on a random foreground pixel
    inside the roi (:class:`medpretrain.data.transforms.PairedRandomCrop`), the rest uniform (0: all uniform)."""

    def __post_init__(self) -> None:
        from medpretrain.config import ConfigError

        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"seg.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.sw_size < 0:
            raise ConfigError(f"seg.sw_size must be >= 0 (0: seg.patch_size), got {self.sw_size}")


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
    """Head initialisation, batch order, augmentation draws and (unless ``data.subset_seed``) the label subset."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = None
    """Default: ``<runs_dir>/finetune/<task>/<init>/<regime>[/tasks-<names>][/<run_tag>]/<fraction>/seed<seed>``."""
    run_tag: str = ""
    """An extra folder level after the regime (a grid's LR axis sets ``lr<lr>``); empty: none."""
    n_bootstrap: int = 1000
    resume: str = ""
    """``auto``: continue from the newest complete epoch checkpoint of this output folder."""
    keep_checkpoints: bool = False
    """Keep the per-epoch resume checkpoints after a successful run (they are large)."""
    tasks: list[TaskSpec] = field(default_factory=list)
    """Multi-task classification (:mod:`medpretrain.multitask`): one head per task on the shared backbone, each
    reading columns of a multi-label source (``data.label_columns``, ChestMNIST's findings); loss = the weighted
    sum of the task losses; selection and the headline metrics = the weighted mean of the task metrics; each
    task's metrics and CIs in ``results.json`` ``tasks``. Empty: the source's own single task."""

    def __post_init__(self) -> None:
        check_tasks(self.tasks, self.task)


def init_label(init: str, name: str = "") -> str:
    """Short name of an init for folders and reports: ``name`` if given, else the init (a checkpoint path
    becomes ``<parent folder>-<file stem>``)."""
    if name:
        return name
    if init.startswith("supervised:"):  # medpretrain.init.SUPERVISED: <run folder> or its model.safetensors
        run = Path(init.removeprefix("supervised:"))
        run = run.parent if run.suffix == ".safetensors" else run
        return f"supervised-{run.parent.name}-{run.name}" if run.parent.name else f"supervised-{run.name}"
    p = Path(init)
    if p.suffix == ".safetensors" or "/" in init:
        return f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem
    return init


def run_hash(cfg: FinetuneConfig) -> str:
    """Hash of what a run computes: the config without the bookkeeping keys (``resume``, ``keep_checkpoints``).

    A grid skips a run whose ``results.json`` carries the same hash.
    """
    return config_hash(dataclasses.replace(cfg, resume="", keep_checkpoints=False))


def label_fraction(cfg: FinetuneConfig) -> float:
    """``data.label_fraction``, 1.0 when unset."""
    return cfg.data.label_fraction if cfg.data.label_fraction is not None else 1.0


def output_dir(cfg: FinetuneConfig) -> Path:
    """``output_dir``, else ``<runs_dir>/finetune/<task>/<init label>/<regime>[/tasks-<names>][/<run_tag>]/<budget>/
    seed<seed>`` (budget: the label fraction, or ``n<images>`` for segmentation; ``tasks-<names>``: a multi-task
    run, :func:`medpretrain.multitask.tasks_label`)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    budget = f"n{cfg.seg.n_train_images or 'all'}" if cfg.task == "segmentation" else f"{label_fraction(cfg):g}"
    regime = Path(cfg.regime.replace(":", "-"))
    if cfg.tasks:  # a multi-task run never shares the folder of the single-task run of the same cell
        regime = regime / f"tasks-{tasks_label(cfg.tasks)}"
    regime = regime / cfg.run_tag if cfg.run_tag else regime
    return (Path(cfg.runs_dir) / "finetune" / cfg.task / init_label(cfg.init, cfg.init_name)
            / regime / budget / f"seed{cfg.seed}")


def main_in_process(argv: list[str] | None = None) -> int:
    """Run ``finetune/run.py``'s ``main(argv)`` in this process (tests, a grid's ``launcher=inprocess``).

    The script is loaded from its file once (it is not a module of the package); exceptions propagate.
    """
    import sys

    name = "medpretrain_finetune_script"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        if spec is None or spec.loader is None:  # pragma: no cover - the file ships with the package
            raise FileNotFoundError(f"{SCRIPT}: fine-tuning script not found")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return int(module.main(argv))


# ------------------------------------------------------------------------------------------------
# Init
# ------------------------------------------------------------------------------------------------


class InitUnavailable(RuntimeError):
    """The requested initialisation does not exist here (ImageNet weights missing, no pretraining export)."""


def build_init(cfg: FinetuneConfig, in_channels: int, stem: str, image_size: int) -> tuple[torch.nn.Module, Any]:
    """Backbone from :func:`medpretrain.init.init_backbone`; a missing init raises :class:`InitUnavailable`.

    ``ImageNetUnavailable`` is a ``FileNotFoundError``, as is a missing pretraining export: neither ever
    falls back to random weights.
    """
    from medpretrain.init import imagenet_archs, init_backbone

    if cfg.init == "imagenet" and cfg.backbone.arch not in imagenet_archs():
        raise InitUnavailable(f"ImageNet weights do not exist for {cfg.backbone.arch!r} (only for "
                              f"{imagenet_archs()})")
    try:
        return init_backbone(cfg.init, cfg.backbone.arch, in_channels, stem, image_size=image_size,
                             weights=cfg.weights, runs_dir=cfg.runs_dir, data_mean=cfg.data.mean,
                             data_std=cfg.data.std)
    except FileNotFoundError as e:
        raise InitUnavailable(str(e)) from e


DATA_FROM_INIT: tuple[tuple[str, str], ...] = (
    ("mean", "mean"), ("std", "std"), ("image_size", "image_size"), ("channels", "in_channels"))
"""``(data option, checkpoint meta field)`` pairs that an init checkpoint overrides."""


def reconcile_with_init(cfg: FinetuneConfig, info: Any, image_size: int,
                        keys: Sequence[tuple[str, str]] = DATA_FROM_INIT) -> list[str]:
    """Use the init checkpoint's input normalisation / size / channels; returns a warning per changed option.

    ``image_size`` is the size the data has under the current config (``data.image_size`` or the source's).
    A per-channel list in the checkpoint is used only when all its values agree.
    """
    meta = getattr(info, "meta", None)
    if meta is None:
        return []
    warnings = []
    for ours, theirs in keys:
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
    return warnings


@dataclass
class Encoder:
    """The init backbone of a run and what came with it (:func:`build_encoder`)."""

    backbone: torch.nn.Module
    info: Any
    stem: str
    warnings: list[str]
    image_size: int
    """Whole-image size of the data after the checkpoint's options (``data.image_size`` or the source's)."""


def build_encoder(cfg: FinetuneConfig, source_size: int) -> Encoder:
    """The init backbone for ``cfg.task`` and the data options of its checkpoint (changes ``cfg.data``).

    Classification: the stem is resolved for the image size and the checkpoint's image size is taken over.
    Segmentation: the encoder sees patches, so an ``auto`` stem follows ``seg.patch_size`` and the image size
    stays the data's (a loaded checkpoint keeps its own stem in both). Raises :class:`InitUnavailable`.
    """
    image_size = cfg.data.image_size or source_size
    if cfg.task == "segmentation":
        stem, size = cfg.backbone.stem, cfg.seg.patch_size
        keys = tuple(k for k in DATA_FROM_INIT if k[0] != "image_size")
    else:
        stem, size, keys = resolve_stem(cfg.backbone.stem, image_size, cfg.backbone.arch), image_size, DATA_FROM_INIT
    backbone, info = build_init(cfg, cfg.data.channels, stem, size)
    warnings = reconcile_with_init(cfg, info, image_size, keys)
    return Encoder(backbone, info, str(getattr(backbone, "stem", stem)), warnings, cfg.data.image_size or image_size)


# ------------------------------------------------------------------------------------------------
# Optimisation and progress
# ------------------------------------------------------------------------------------------------


class Progress:
    """Period counter, best validation score (the task's headline metric) and history: checkpointed with the model.

    A period ("epoch" in ``metrics.csv`` and the checkpoints) is one pass over the training images, or
    ``optim.eval_every`` steps under a step budget (:class:`Budget`). ``best_auc`` keeps its name (it is in
    saved resume states); for segmentation it holds the best Dice.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.best_auc = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.__dict__)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(json.loads(state["json"]))

    def record(self, row: dict[str, Any], val: dict[str, float], score: float, patience: int) -> tuple[bool, bool]:
        """Add epoch ``row["epoch"]`` with its validation metrics; ``score`` is the selection score.
        Returns (improved, stop early)."""
        self.history.append({**row, "val": val})
        self.epoch = row["epoch"]
        improved = math.isfinite(score) and score > self.best_auc
        if improved:
            self.best_auc, self.best_epoch, self.bad_epochs = score, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved, bool(patience) and self.bad_epochs >= patience

    @property
    def val_best(self) -> dict[str, float]:
        """Validation metrics of the selected epoch."""
        return self.history[self.best_epoch - 1]["val"]


@dataclass(frozen=True)
class Budget:
    """The optimiser steps of a run and its validation periods.

    ``optim.steps > 0``: ``total_steps = optim.steps`` whatever the label fraction, in ``periods`` of
    ``period_steps`` (``optim.eval_every``; the last one may be shorter), the LR schedule stepped every step.
    ``optim.steps = 0``: one period per epoch of ``period_steps`` batches (the loader's length, capped by
    ``optim.max_steps_per_epoch``), the schedule stepped per epoch.
    """

    total_steps: int
    period_steps: int
    periods: int
    in_steps: bool

    def steps_before(self, period: int) -> int:
        """Optimiser steps done when period ``period`` (1-based) starts."""
        return min(self.total_steps, (period - 1) * self.period_steps)

    def steps_in(self, period: int) -> int:
        """Optimiser steps of period ``period`` (1-based)."""
        return min(self.total_steps, period * self.period_steps) - self.steps_before(period)


def budget_of(optim: OptimConfig, loader_len: int) -> Budget:
    """The :class:`Budget` of ``optim`` for a training loader of ``loader_len`` batches per pass (epochs mode)."""
    if optim.steps > 0:
        every = optim.eval_every or max(1, math.ceil(optim.steps / 10))
        every = min(every, optim.steps)
        return Budget(optim.steps, every, math.ceil(optim.steps / every), True)
    per_epoch = min(loader_len, optim.max_steps_per_epoch or loader_len)
    return Budget(per_epoch * optim.epochs, per_epoch, optim.epochs, False)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler of a step budget: ``total_steps`` batches of ``batch_size`` indices into ``n`` training
    items, read off an endless stream of passes, pass ``p`` being a permutation of ``range(n)`` drawn from
    ``numpy.random.SeedSequence([seed, p])`` (so a budget larger than the data cycles over it, a batch may
    span two passes, and every index appears once per pass).

    Iterating yields the batches of the current period only (:attr:`period`, 1-based, set before each
    period: steps ``[(period - 1) * period_steps, period * period_steps)``), ``num_processes`` batches per
    step (accelerate's ``BatchSamplerShard`` hands each process its own). The batches depend only on the
    seed and the period, so a run resumed at a period boundary draws exactly the batches of the
    uninterrupted one. Raises ``ValueError`` for empty data or non-positive sizes.
    """

    def __init__(self, n: int, batch_size: int, budget: Budget, seed: int, num_processes: int = 1,
                 weights: np.ndarray | None = None):
        if n < 1 or batch_size < 1 or num_processes < 1:
            raise ValueError(f"StepBatches needs n, batch_size, num_processes >= 1, got {n}, {batch_size}, "
                             f"{num_processes}")
        if weights is not None and (len(weights) != n or not np.all(np.asarray(weights) >= 0)
                                    or not np.asarray(weights).sum() > 0):
            raise ValueError(f"StepBatches weights need {n} non-negative values with a positive sum")
        self.n, self.batch_size, self.budget, self.seed = n, batch_size, budget, seed
        self.num_processes = num_processes
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.period = 1
        self._passes: dict[int, np.ndarray] = {}

    def _pass(self, p: int) -> np.ndarray:
        """Pass ``p``: a permutation of ``range(n)``; with ``weights``, ``n`` indices drawn with replacement
        with those probabilities (:attr:`OptimConfig.class_balance`)."""
        if p not in self._passes:
            if len(self._passes) > 64:  # only a few passes are live at a time
                self._passes.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, p]))
            self._passes[p] = rng.permutation(self.n) if self.weights is None else rng.choice(self.n, self.n,
                                                                                              p=self.weights)
        return self._passes[p]

    def batch(self, b: int) -> list[int]:
        """Global batch ``b`` (0-based; ``num_processes`` of them per step)."""
        start = b * self.batch_size
        pos = np.arange(start, start + self.batch_size)
        passes, offsets = pos // self.n, pos % self.n
        return [int(self._pass(int(p))[o]) for p, o in zip(passes, offsets, strict=True)]

    def __len__(self) -> int:
        return self.budget.steps_in(self.period) * self.num_processes

    def __iter__(self):  # type: ignore[no-untyped-def]
        first = self.budget.steps_before(self.period) * self.num_processes
        for b in range(first, first + len(self)):
            yield self.batch(b)


def train_loader(ds: Any, cfg: FinetuneConfig, num_processes: int = 1) -> DataLoader:
    """The training loader: ``optim.steps`` > 0: :class:`StepBatches` seeded by ``seed`` (the same number of
    steps for every label fraction; ``optim.class_balance``: classes drawn equally often, from ``ds.labels``);
    else shuffled by a generator seeded by ``seed``, ``drop_last`` when the split holds more than one batch
    (epochs mode, as before)."""
    if cfg.optim.steps > 0:
        weights = None
        if cfg.optim.class_balance:
            labels = getattr(ds, "labels", None)
            labels = None if labels is None else np.asarray(labels)
            if cfg.task != "classification" or labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise ConfigError("optim.class_balance=true balances the classes of single-label classification; "
                                  f"this run's training set (task {cfg.task}) has no class index per image")
            weights = balanced_weights(torch.as_tensor(labels)).numpy()
        sampler = StepBatches(len(ds), cfg.optim.batch_size, budget_of(cfg.optim, 0), cfg.seed, num_processes,
                              weights=weights)
        return DataLoader(ds, batch_sampler=sampler, num_workers=cfg.data.num_workers)
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, generator=g,
                      num_workers=cfg.data.num_workers, drop_last=len(ds) > cfg.optim.batch_size)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule over the budget: step decay by ``gamma`` at ``milestones`` or cosine annealing to 0.

    Under a step budget it is defined in optimiser steps (milestone ``m`` decays after ``int(m * steps)``
    steps; cosine spans ``steps``) and stepped after every step; otherwise in epochs and stepped per epoch.
    """
    length = optim.steps if optim.steps > 0 else optim.epochs
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length, eta_min=0.0)
    milestones = sorted({max(1, int(m * length)) for m in optim.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=optim.gamma)


def build_optimizer(model: torch.nn.Module, regime: Any, cfg: FinetuneConfig,
                    stem: str) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Any]:
    """``apply_regime`` on ``model.backbone`` (``reinit`` draws a scratch backbone seeded ``seed + 1``), the
    ``optim.optimizer`` over its parameter groups, and the LR schedule (:func:`build_scheduler`).

    ``optim.backbone_lr_mult`` applies to the kept backbone weights of every init, scratch included.
    The scheduler is not passed to ``prepare()`` (accelerate steps prepared schedulers once per process
    per call); it is checkpointed by ``save_checkpoint(state=...)``. Returns ``(optimizer, scheduler, regime_info)``.
    """
    torch.manual_seed(cfg.seed + 1)  # the re-init weights: a scratch backbone of the same architecture
    fresh = build_backbone(cfg.backbone.arch, cfg.data.channels, stem) if regime.kind == "reinit" else None
    # pretrained=True for every init: the multiplier is a hyper-parameter of the protocol, not of the init.
    groups, regime_info = apply_regime(
        model, regime, lr=cfg.optim.lr, backbone_lr_mult=cfg.optim.backbone_lr_mult,  # type: ignore[arg-type]
        weight_decay=cfg.optim.weight_decay, pretrained=True, fresh_backbone=fresh,
    )
    optimizer: torch.optim.Optimizer
    if cfg.optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, fused=fused(groups))
    elif cfg.optim.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=fused(groups))
    else:
        optimizer = torch.optim.Adam(groups, lr=cfg.optim.lr, fused=fused(groups))
    return optimizer, build_scheduler(optimizer, cfg.optim), regime_info


# ------------------------------------------------------------------------------------------------
# Task parts
# ------------------------------------------------------------------------------------------------


@dataclass
class TaskParts:
    """What a task gives the training loop of ``finetune/run.py``.

    ``loss(logits, batch)``; ``predict(model, loader)`` -> arrays over a whole split (gathered);
    ``evaluate(pred, threshold)`` -> ``(mean metrics, per-case rows or None)`` (``threshold=None``: the
    selection-time default, 0.5 / ``seg.threshold``); ``choose_threshold(val_pred)`` -> ``(threshold, rule in
    words)`` chosen on validation for test; ``val_columns``: the validation metrics logged per period (the
    headline first); ``test_fields(pred, rows, threshold)`` -> the task's own
    :class:`~medpretrain.results.RunResult` fields (``ci``, ``roc`` / ``per_image``, ...);
    ``save_outputs(out, pred, threshold)`` writes ``predictions.npz`` (and overlays).
    """

    label_task: str
    model: torch.nn.Module
    datasets: dict[str, Any]
    loaders: dict[str, DataLoader]
    loss: Callable[[Any, dict[str, Any]], torch.Tensor]
    """``(model output, batch) -> loss``; the output is a logits tensor, or a dict of them (multi-task)."""
    predict: Callable[[torch.nn.Module, Any], dict[str, np.ndarray]]
    evaluate: Callable[[dict[str, np.ndarray], Any], tuple[dict[str, float], list[dict[str, float]] | None]]
    choose_threshold: Callable[[dict[str, np.ndarray]], tuple[Any, str]]
    test_fields: Callable[[dict[str, np.ndarray], list[dict[str, float]] | None, Any], dict[str, Any]]
    save_outputs: Callable[[Path, dict[str, np.ndarray], Any], None]
    val_columns: tuple[str, ...]
    budget: str
    """The label budget in words, for the start-up line."""
    summary: str
    """The task in words, for the start-up line."""
    cases: str
    """The test set in words (``624``, ``20 images``)."""
    label_fraction: float
    n_train_images: int | None
    data: dict[str, Any]
    """``results.json`` ``data`` block (dataset, fingerprint, split sizes, ...)."""
    model_meta: dict[str, Any]
    """Task-specific metadata of ``model.safetensors``."""
    multitask: MultiTask | None = None
    """Multi-task classification (``tasks``): the tasks and their protocol; ``None`` for a single task."""

    @property
    def headline(self) -> str:
        return headline_metric(self.label_task)


def build_dataloaders(cfg: FinetuneConfig, num_processes: int = 1) -> dict[str, Any]:
    """Classification: the label subset drawn by ``seed`` (unless ``data.subset_seed``), with ``data.synthetic``'s
    images added to it (:func:`medpretrain.data.synthetic.augment_train`, drawn by ``seed``; training split only),
    the seeded train loader (:func:`train_loader`); val / test at ``optim.eval_batch_size``.

    Returns ``datasets``, ``loaders`` and ``data``: the ``results.json`` ``data`` fields of the synthetic images
    (``{"synthetic": ...}``, empty without them); ``datasets["train"]`` is then a
    :class:`~medpretrain.data.synthetic.SyntheticAugmented` whose ``real`` is the label budget's real images."""
    synthetic.check_options(cfg.data, cfg.task, multitask=bool(cfg.tasks))
    ds = {split: build_dataset(cfg.data, split, seed=cfg.seed if split == "train" else None)
          for split in ("train", "val", "test")}
    ds["train"] = synthetic.augment_train(ds["train"], cfg.data, cfg.seed)
    loaders = {
        "train": train_loader(ds["train"], cfg, num_processes),
        "val": DataLoader(ds["val"], batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.num_workers),
        "test": DataLoader(ds["test"], batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.num_workers),
    }
    added = getattr(ds["train"], "synthetic", None)
    return {"datasets": ds, "loaders": loaders, "data": {"synthetic": added} if added is not None else {}}


def check_synthetic(cfg: FinetuneConfig) -> None:
    """Fail on ``data.synthetic*`` that the run cannot use (wrong task, bad file, too few images of a class) before
    any output folder exists: the draw of :func:`build_dataloaders`, done once more."""
    if cfg.data.synthetic:
        synthetic.check_options(cfg.data, cfg.task, multitask=bool(cfg.tasks))
        synthetic.augment_train(build_dataset(cfg.data, "train", seed=cfg.seed), cfg.data, cfg.seed)


def classification_loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy (binary heads have two logits, the MedMNIST convention); BCE per label for multi-label."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, task: str, accelerator: Any) -> dict[str, np.ndarray]:
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


def build_seg_dataloaders(cfg: FinetuneConfig, num_processes: int = 1) -> dict[str, Any]:
    """Patch loader over ``seg.n_train_images`` seeded training images; whole-image val / test loaders.

    Raises ``ValueError`` (a ``ConfigError``) when the budget exceeds the training split.
    """
    from torch.utils.data import Subset

    from medpretrain.config import ConfigError
    from medpretrain.data.transforms import Compose, PairedRandomCrop, PairedRandomFlip

    synthetic.check_options(cfg.data, cfg.task)  # segmentation refuses data.synthetic
    patches = Compose([PairedRandomCrop(cfg.seg.patch_size, foreground=cfg.seg.foreground_fraction),
                       PairedRandomFlip()])
    full_train = build_dataset(cfg.data, "train", transform=patches)
    n_all = len(full_train)
    n = cfg.seg.n_train_images or n_all
    if not 1 <= n <= n_all:
        raise ConfigError(f"seg.n_train_images={cfg.seg.n_train_images} but the training split has {n_all} images")
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(n_all)[:n])
    # Each chosen image appears patches_per_image times per epoch, each time with a fresh random crop.
    train = Subset(full_train, np.repeat(chosen, cfg.seg.patches_per_image).tolist())
    ds = {"train": full_train, "val": build_dataset(cfg.data, "val"), "test": build_dataset(cfg.data, "test")}
    loaders = {
        "train": train_loader(train, cfg, num_processes),
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
def predict_images(model: torch.nn.Module, loader: Any, cfg: FinetuneConfig, accelerator: Any) -> dict[str, np.ndarray]:
    """Foreground probabilities of whole images by MONAI sliding-window inference, gathered across processes.

    Windows of ``seg.sw_size`` (default the patch size), Gaussian-weighted where they overlap; ``seg.tta=flips``:
    the mean probability over the four flips of each image. Returns ``probs``, ``masks``, ``rois`` ``[N, H, W]``
    and ``index`` ``[N]`` (images of one split share a size).
    """
    from monai.inferers import sliding_window_inference

    model.eval()
    probs, masks, rois, index = [], [], [], []
    side = cfg.seg.sw_size or cfg.seg.patch_size
    flips = [(), (-1,), (-2,), (-2, -1)] if cfg.seg.tta == "flips" else [()]
    for batch in loader:
        p = torch.zeros(())
        for dims in flips:
            x = batch["image"].flip(dims) if dims else batch["image"]
            logits = torch.as_tensor(sliding_window_inference(x, (side, side), cfg.seg.sw_batch_size, model,
                                                              overlap=cfg.seg.sw_overlap, mode="gaussian"))
            p = p + torch.sigmoid(logits.flip(dims) if dims else logits)[:, 0]
        p = p / len(flips)
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


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def complete_result(cfg: FinetuneConfig, parts: TaskParts, enc: Encoder, regime: Any, regime_info: Any,
                    progress: Progress, test_metrics: dict[str, float], task_fields: dict[str, Any], *,
                    requested_hash: str, t_run: float, accelerator: Any, out: Path,
                    val_metrics: dict[str, float] | None = None) -> RunResult:
    """The :class:`RunResult` of a finished run (``task_fields`` from :attr:`TaskParts.test_fields`, with
    ``optimizer_steps``, ``threshold`` and ``threshold_rule``). ``val_metrics``: validation metrics of the
    selected checkpoint at the chosen threshold (default: those logged when it was selected)."""
    history = progress.history
    e95 = epochs_to_fraction_of_best([h[f"val_{parts.headline}"] for h in history], 0.95)
    names = metric_names(parts.label_task)  # a multi-task run's per-task entries are in task_fields["tasks"]
    val = val_metrics if val_metrics is not None else progress.val_best
    return RunResult(
        status="complete", task=cfg.task, label_task=parts.label_task, init=cfg.init,
        init_label=init_label(cfg.init, cfg.init_name), init_info=jsonable(enc.info), init_warnings=enc.warnings,
        regime=str(regime), regime_info=jsonable(regime_info), label_fraction=parts.label_fraction,
        n_train_images=parts.n_train_images, seed=cfg.seed,
        metrics={"test": {k: v for k, v in test_metrics.items() if k in names},
                 "val_best": {k: v for k, v in val.items() if k in names}},
        best_epoch=progress.best_epoch, epochs_run=progress.epoch,
        epochs_to_95=e95, steps_to_95=history[e95 - 1].get("step") if e95 else None,
        seconds_to_95=float(sum(h["epoch_s"] for h in history[:e95])) if e95 else None,
        history=[{k: v for k, v in h.items() if k != "val"} for h in history],
        timing={"mean_epoch_s": float(np.mean([h["epoch_s"] for h in history])),
                "total_s": time.perf_counter() - t_run, "processes": accelerator.num_processes,
                "device": str(accelerator.device)},
        data=jsonable(parts.data), config=config_to_dict(cfg), config_hash=requested_hash,
        resolved_config_hash=run_hash(cfg), code_version=code_version(), torch=torch.__version__, run_dir=str(out),
        **jsonable(task_fields),
    )


def unavailable_result(cfg: FinetuneConfig, reason: str, requested_hash: str) -> RunResult:
    """The :class:`RunResult` of an arm whose init does not exist here (it is never run with random weights)."""
    return RunResult(
        status="unavailable", reason=reason, task=cfg.task, init=cfg.init,
        init_label=init_label(cfg.init, cfg.init_name), regime=cfg.regime, seed=cfg.seed,
        label_fraction=label_fraction(cfg),
        n_train_images=cfg.seg.n_train_images if cfg.task == "segmentation" else None,
        config=config_to_dict(cfg), config_hash=requested_hash, code_version=code_version(),
    )


def failed_result(cfg: FinetuneConfig, reason: str, log_tail: str = "") -> RunResult:
    """The :class:`RunResult` a grid records for a run that exited with an error (no ``results.json`` of its own)."""
    return RunResult(
        status="failed", reason=reason, log_tail=log_tail, task=cfg.task,
        init_label=init_label(cfg.init, cfg.init_name), regime=cfg.regime,
        label_fraction=cfg.data.label_fraction, seed=cfg.seed, n_train_images=cfg.seg.n_train_images,
    )


__all__ = [
    "EXIT_UNAVAILABLE", "SCRIPT", "Budget", "Encoder", "EvalConfig", "FinetuneConfig", "InitUnavailable",
    "OptimConfig", "Progress", "SegConfig", "StepBatches", "TaskParts", "budget_of", "build_dataloaders",
    "build_encoder", "check_synthetic", "build_init", "build_optimizer", "build_scheduler", "train_loader",
    "build_seg_dataloaders", "classification_loss", "complete_result", "failed_result", "init_label",
    "label_fraction", "main_in_process", "output_dir", "predict", "predict_images", "reconcile_with_init",
    "run_hash", "save_overlays", "seg_loss", "unavailable_result",
]
