"""What every self-supervised method is made of, and the method table the shared loop reads.

A method (lightly's ``benchmarks/imagenet/resnet50/main.py`` ``METHODS`` table, one module per method) is

* its config group, a dataclass whose keys sit under the method's name (``simclr.temperature``);
* a :class:`Method` module: the backbone (exported as the contract checkpoint), its heads, any momentum
  copies and the loss; its ``forward`` takes the two views of a batch and returns the training loss, so
  that under DDP the whole step runs through the wrapper's forward (as Lightning routes
  ``training_step``), including the momentum encoders, which carry no gradient;
* one :func:`register_method` call at the bottom of its module, naming the entry script, the YAML and the
  run folder (a :class:`~medpretrain.methods.registry.StageInfo`).

The loop (:func:`medpretrain.pretrain.main`) builds the method, optimises its trainable parameters and calls
:meth:`Method.before_step` once per optimizer step (momentum updates and schedules) and
:meth:`Method.on_after_backward` after every backward pass. The full config of a method's entry point is
:func:`pretrain_config`: the shared groups (``data``, ``backbone``, ``aug``, ``train``), the method's group,
``split``, ``out_dir`` and ``run_name``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from medpretrain.augment import AugmentConfig
from medpretrain.backbones import Backbone
from medpretrain.config import BackboneConfig, ConfigError, DataConfig
from medpretrain.methods.registry import StageInfo, register

M = TypeVar("M", bound=nn.Module)

GENERIC_SCRIPT = "pretrain/train.py"
"""The entry script that trains every registered method (``pretrain/train.py method=byol``)."""


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and fault-tolerance options shared by every method."""

    epochs: int = 1
    """Passes over the pretraining split (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """> 0: stop after exactly this many optimizer steps (a step budget, used by tests and benchmarks)."""
    batch_size: int = 128
    """Images per process per micro-batch; the contrastive batch is ``batch_size x processes``."""
    grad_accum: int = 1
    """Gradient accumulation steps (note: contrastive negatives come from one micro-batch only)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.06
    """Peak learning rate: for a global batch of 128, scaled linearly with the global batch (lightly's
    SimCLR/MoCo examples and benchmarks: SGD, lr 0.06 at batch 128); with ``lr_scaling=none`` the value itself."""
    lr_scaling: Literal["linear", "none"] = "linear"
    """``linear``: the peak is ``lr * global_batch / 128`` (global batch = views per optimizer step, patches
    included); ``none``: ``lr`` is the absolute peak (small sets, where batch 9 would divide 0.06 by 14)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay to 0."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    """Force ``channels_last`` (else ``backbone.memory_format`` decides; ``auto``: for depthwise convolutions)."""
    compile: bool = False
    """``torch.compile`` the model (first steps are slow while it compiles)."""
    sync_bn: bool = False
    """SyncBatchNorm across processes (only with more than one process on GPUs)."""
    seed: int = 0
    patch_size: int = 0
    """> 0: pretrain on random ``patch_size`` squares cut from the images as the data options give them (at
    native resolution when ``data.image_size`` is unset, e.g. DRIVE's 565x584 fundus photographs), and build
    the views from those patches: what a segmentation model fine-tuned on patches sees. 0: whole images."""
    patches_per_image: int = 1
    """Patches cut from every image of a batch when ``patch_size`` > 0: a step contrasts ``batch_size x
    patches_per_image`` patches (a set of 18 images still gives batches of 64)."""
    cache_on_device: bool = True
    """Keep the decoded split as one tensor on the training device and index batches from it: the
    loader then costs nothing. Turn off for datasets larger than device memory (a DataLoader with
    ``data.num_workers`` workers is used instead)."""
    log_every: int = 5
    """Optimizer steps between CSV/TensorBoard rows (and NaN checks)."""
    checkpoint_every: int = 50
    """Optimizer steps between ``accelerator.save_state`` checkpoints (0: only at the end)."""
    checkpoint_total_limit: int = 2
    """Checkpoints kept (>= 2, so a kill mid-write always leaves a complete one)."""
    resume: str = ""
    """``auto``: continue the newest unfinished run (or ``run_name``) from its latest complete
    checkpoint; a path: that checkpoint folder; empty: start fresh."""
    knn_every: int = 1
    """Epochs between kNN evaluations on the labelled validation split (0: only at the end; -1: never)."""
    knn_k: int = 20
    knn_t: float = 0.07
    knn_split: Literal["val", "train"] = "val"
    """Where the kNN bank's labels come from: ``val`` = leave-one-out within the validation split (no
    training labels are touched), ``train`` = train-split labels as the bank, validation as queries."""

    def __post_init__(self) -> None:
        if self.patch_size < 0:
            raise ConfigError(f"config key 'train.patch_size': must be >= 0 (0 = whole images), got {self.patch_size}")
        if self.patches_per_image < 1:
            raise ConfigError(f"config key 'train.patches_per_image': must be >= 1, got {self.patches_per_image}")
        if self.patches_per_image > 1 and self.patch_size == 0:
            raise ConfigError("config key 'train.patches_per_image': needs train.patch_size > 0")


def _check_split(self: Any) -> None:
    if self.split not in ("train", "all"):
        raise ConfigError(f"config key 'split': must be 'train' or 'all' (never test), got {self.split!r}")


def pretrain_config(name: str, group: type, qualname: str, module: str) -> type:
    """The config dataclass of method ``name``'s entry point, keys in this order: ``data``, ``backbone``,
    ``aug``, ``train``, ``<name>`` (the method's ``group``), ``split``, ``out_dir``, ``run_name``.

    ``qualname``/``module`` name the class where it is defined (``SimCLRConfig`` in
    ``medpretrain.methods.simclr``), so the schema can be imported by name. ``split`` other than
    ``train``/``all`` raises :class:`~medpretrain.config.ConfigError` on construction.
    """
    fields: list[tuple[str, Any, Any]] = [
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("backbone", BackboneConfig, field(default_factory=BackboneConfig)),
        ("aug", AugmentConfig, field(default_factory=AugmentConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        (name, group, field(default_factory=group)),
        ("split", str, field(default="train")),
        ("out_dir", str, field(default=f"runs/pretrain/{name}")),
        ("run_name", str, field(default="")),
    ]
    cls = dataclasses.make_dataclass(
        qualname, fields,
        namespace={"ALIASES": {"resume": "train.resume"}, "__post_init__": _check_split, "__module__": module,
                   "__doc__": f"Config of ``{name}`` pretraining: shared groups, the ``{name}`` group, the run folder.\n\n"
                              "``split``: pretraining images, ``train`` or ``all`` (train + val); never the test split.\n"
                              "Labels are unused. ``run_name``: the run folder's name; empty = a timestamp."},
    )
    cls.__qualname__ = qualname
    return cls


class Method(nn.Module):
    """A self-supervised method: the trained ``backbone`` plus heads, momentum copies and loss.

    Subclasses set ``title`` (for messages) and implement :meth:`forward`. The backbone is the contract
    :class:`~medpretrain.backbones.Backbone` (``[B, C, H, W] -> [B, num_features]``); it is the part exported.
    Modules that only move by momentum must have ``requires_grad=False`` (the optimizer skips them).
    """

    title: ClassVar[str] = ""

    def __init__(self, backbone: Backbone, cfg: Any = None, processes: int = 1):
        """``cfg``: the method's config group; ``processes``: the size of the process group."""
        super().__init__()
        self.backbone = backbone

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The training loss (a float32 scalar) of two views ``[B, C, H, W]`` of the same images."""
        raise NotImplementedError

    def before_step(self, step: int, total_steps: int) -> None:
        """Once per optimizer step, before its (last micro-batch's) forward: momentum updates, schedules.

        ``step`` counts the optimizer steps done so far (0 for the first).
        """

    def on_after_backward(self, step: int) -> None:
        """After every backward pass, before the optimizer step (e.g. DINO's frozen last layer)."""

    def check_data(self, n_images: int) -> None:
        """Before the first step: raise :class:`~medpretrain.config.ConfigError` when the method's options
        cannot work on ``n_images`` pretraining images (e.g. a MoCo queue as large as the data)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Objects with ``state_dict()`` that the model's own ``state_dict()`` misses (non-persistent
        buffers such as lightly's memory bank); saved in ``training_state.safetensors``."""
        return {}


def momentum_copy(module: M) -> M:
    """A copy of ``module`` that only moves by momentum: deep-copied, gradients off (lightly's
    ``deactivate_requires_grad``), so the optimizer skips it."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


class MomentumMethod(Method):
    """A method with momentum (target / key / teacher) copies: MoCo, BYOL, DenseCL, DINO.

    ``momentum_pairs`` names the ``(online, target)`` attributes; :meth:`update_targets` moves every target
    towards its online module with lightly's ``update_momentum`` at ``m = cosine_schedule(step, total_steps,
    cfg.momentum, 1.0)`` (from ``cfg.momentum`` to 1, per optimizer step, as lightly's benchmarks do). The
    attribute names are the state-dict keys of checkpoints, so each method keeps its own."""

    momentum_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()
    cfg: Any

    def update_targets(self, step: int, total_steps: int) -> float:
        """One momentum update of every pair; returns the ``m`` used."""
        m = float(cosine_schedule(step, total_steps, self.cfg.momentum, 1.0))
        for online, target in self.momentum_pairs:
            update_momentum(getattr(self, online), getattr(self, target), m=m)
        return m

    def before_step(self, step: int, total_steps: int) -> None:
        self.update_targets(step, total_steps)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table: the module class and its entry point's config class."""

    name: str
    method: type[Method]
    config: type


METHODS: dict[str, MethodSpec] = {}
"""Every registered method by name (filled by :func:`register_method` when its module is imported)."""


def register_method(info: StageInfo, method: type[Method], config: type) -> MethodSpec:
    """Register a method: its stage (entry script, YAML, run folder) and its row in :data:`METHODS`."""
    if info.kind != "selfsup":
        raise ValueError(f"method {info.name!r} must be registered as kind 'selfsup', got {info.kind!r}")
    if not dataclasses.is_dataclass(config) or info.name not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"method {info.name!r}: its config class needs a {info.name!r} group")
    register(info)
    spec = MethodSpec(info.name, method, config)
    METHODS[info.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The registered method called ``name``; :class:`~medpretrain.config.ConfigError` naming the known ones."""
    import medpretrain.methods  # noqa: F401  (importing the package registers every method module)

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
