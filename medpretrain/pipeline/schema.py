"""The experiment schema: :data:`ExperimentConfig` (``configs/experiments/*.yaml``) and its sections.

One :class:`StageSpec` section per registered training stage (:func:`medpretrain.methods.registry.all_stages`,
generator-only ones such as ``ddpm`` included): a method registered later gets its section
(``byol: {enabled: true}``) with no edit here. Read by
:mod:`.experiment` (which runs it), :mod:`.stages` and :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal

from medpretrain.methods import registry

# The stages an experiment ran before the registry existed run unless disabled; a stage registered later is
# opt-in (``<name>: {enabled: true}``), so an existing experiment file keeps meaning what it meant.
DEFAULT_ENABLED = ("simclr", "moco", "vae", "dcgan")
GRID_TASKS = ("classification", "segmentation")


@dataclass
class StageSpec:
    enabled: bool = True
    config: str = ""
    """The stage script's config file (default: the stage's registered config, ``configs/<stage>.yaml``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for the stage script, after ``common``."""
    seeds: list[int] = field(default_factory=list)
    """Pretraining replicates: one run per seed (``train.seed=<s>``); fine-tune seed number ``i`` of a grid
    starts from replicate ``i mod len(seeds)``, so the seed spread of a cell includes the pretraining's.
    Empty: one run at the config's own seed."""


@dataclass
class GridSpec:
    enabled: bool = False
    config: str = "configs/compare.yaml"
    """A grid config (:class:`medpretrain.pipeline.grid.CompareConfig`; its ``base_config`` is the fine-tune
    config of every cell)."""
    inits: list[str] = field(default_factory=list)
    """``scratch``, ``imagenet``, the name of an enabled training stage (its export), or ``<label>=<path>``.
    Empty: ``scratch``, ``imagenet`` and every enabled training stage that exports a backbone (a generator-only
    stage such as ``ddpm`` is refused here: it has nothing to transfer)."""
    grid: list[str] = field(default_factory=list)
    """``key=value`` for the grid itself (``label_fractions=[...]``, ``seeds=[...]``, ``regimes=[...]``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for every fine-tune run, after ``common`` (``optim.epochs=10`` ...)."""


@dataclass
class AuditSpec:
    enabled: bool = True
    config: str = "configs/audit.yaml"
    generators: list[str] = field(default_factory=list)
    """Generator stages whose samples are audited (those enabled: ``vae``, ``dcgan``, ``ddpm``). Empty: every
    enabled generator stage."""
    features: str = "simclr"
    """Backbone of the discriminator and feature metrics: a training stage, ``imagenet`` or ``scratch``."""
    n_samples: int = 1000
    mix: str = "data"
    """How a conditional generator's ``n_samples`` are spread over the classes (``generative/sample.py mix=``):
    ``data``, the real training images' class mix, so that the overall FID / KID / PRDC and the discriminators
    compare like with like (the per-class metrics compare each class at equal sizes either way); ``even``."""
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """``key=value`` for scripts/audit_synthetic.py (``data.*`` keys of ``common`` are passed too)."""


@dataclass
class VariantSpec:
    """An architecture (or input) variant of the experiment: some arms run again with extra overrides, so that
    e.g. scratch, ImageNet and SimCLR are compared on EfficientNet-Lite0 next to the ResNet-18 arms."""

    name: str = ""
    """Suffix of the variant's arms in folders and reports: ``<init>@<name>`` (e.g. ``imagenet@lite0``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` applied last, to the variant's training stages and fine-tune cells
    (``backbone.arch=timm:tf_efficientnet_lite0``, ``data.image_size=64``): the report lists them."""
    stages: list[str] = field(default_factory=list)
    """Enabled training stages run again with ``overrides`` (their exports are the inits ``<stage>@<name>``)."""
    inits: list[str] = field(default_factory=list)
    """The variant's arms in every enabled grid: ``scratch``, ``imagenet`` or a stage of ``stages``.
    Empty: ``scratch``, ``imagenet`` and ``stages``."""
    grid: list[str] = field(default_factory=list)
    """Grid options of the variant's grids, after the task's ``grid`` (``label_fractions=[1.0]``,
    ``regimes=[full]``, ``seeds=[0, 1, 2]``): a costly variant (a larger image size, say) can run only the cells
    that answer its question. Its arms are then compared with the others only where both have cells."""


@dataclass
class LaunchSpec:
    launcher: Literal["accelerate", "torchrun", "python"] = "accelerate"
    config_file: str = "configs/accelerate/single.yaml"
    """``accelerate`` only: one of ``configs/accelerate/`` (single, multi_gpu, fsdp, multi_node) or your own."""
    args: list[str] = field(default_factory=list)
    """Extra launcher arguments (``[--machine_rank, 1]``; torchrun: ``[--nproc_per_node, 2]``)."""


def _experiment_config() -> type:
    """The experiment schema: fixed sections around one ``StageSpec`` per registered training stage."""
    stage_fields = [(name, StageSpec, field(default_factory=functools.partial(StageSpec, name in DEFAULT_ENABLED)))
                    for name in registry.all_stages()]  # generator-only stages (ddpm) too
    cls = dataclasses.make_dataclass("ExperimentConfig", [
        ("name", str, field(default="experiment")),
        ("title", str, field(default="")),
        ("description", str, field(default="")),
        ("out_dir", str, field(default="runs/experiments")),
        ("common", list[str], field(default_factory=list)),
        ("launch", LaunchSpec, field(default_factory=LaunchSpec)),
        *stage_fields,
        ("classification", GridSpec, field(default_factory=GridSpec)),
        ("segmentation", GridSpec, field(default_factory=lambda: GridSpec(config="configs/compare_drive.yaml"))),
        ("audit", AuditSpec, field(default_factory=AuditSpec)),
        ("variants", list[VariantSpec], field(default_factory=list)),
        ("dry_run", bool, field(default=False)),
    ])
    cls.__module__ = __name__
    cls.__doc__ = """An experiment file (``configs/experiments/*.yaml``).

    ``name``: results go to ``<out_dir>/<name>/``; ``title``, ``description``: the report's heading and its
    paragraph (the question and the budget); ``common``: ``key=value`` given to every training stage and
    fine-tune run (``data.dataset=...``, ``backbone.arch=...``); ``launch``: how stages start; one section per
    training stage; the two grids; the audit; ``variants``: arms run again on another architecture or input
    size (:class:`VariantSpec`), compared in the same grids; ``dry_run``: say what would run, resume or be reused, run nothing.
    """
    return cls


ExperimentConfig: Any = _experiment_config()
