"""Names of everything that trains a backbone: the one list that ``--init``, the experiment runner, the grid
defaults and the benchmarks read.

Each entry says which entry script trains it, its default config, and the files its run folder holds
when it is done. Self-supervised methods register themselves from their own module under
:mod:`medpretrain.methods`; the generative models are listed here.

A stage may also be generator-only (``exports_backbone=False``, the DDPM): it trains an image model and no
backbone, so it is an experiment stage (:func:`all_stages`) and a generator (:func:`generators`) but neither an
``--init`` nor a grid arm (:func:`stages`, :func:`selfsup_methods`, :func:`generative_models` leave it out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKBONE_FILE = "backbone.safetensors"


@dataclass(frozen=True)
class StageInfo:
    """A training stage whose run exports a contract backbone (``backbone.safetensors``), or, with
    ``exports_backbone=False``, only an image model (``products["generator"]``)."""

    name: str
    kind: Literal["selfsup", "generative"]
    script: str
    """Entry script, relative to the project root."""
    config: str
    """Default config file, relative to the project root."""
    out_dir: str
    """Default ``out_dir`` of its runs (where ``--init <name>`` looks first)."""
    products: dict[str, str] = field(default_factory=dict)
    """Other files of a finished run by role (``generator``: the sampler's weights)."""
    description: str = ""
    schema: str = ""
    """The entry script's config dataclass as ``"module:Class"`` (importable from the library), or ``""``.
    When set, the experiment runner validates the stage's config against it before hashing
    (:func:`medpretrain.pipeline.stages.stage_config`)."""
    exports_backbone: bool = True
    """False: a generator-only stage (no backbone to transfer); ``products["generator"]`` marks a finished run."""

    def __post_init__(self) -> None:
        if not self.exports_backbone and "generator" not in self.products:
            raise ValueError(f"stage {self.name!r} exports no backbone, so it needs products['generator'] "
                             "(the file that marks a finished run)")

    @property
    def done_file(self) -> str:
        """The file a finished run holds: ``backbone.safetensors``, or the generator of a generator-only stage."""
        return BACKBONE_FILE if self.exports_backbone else self.products["generator"]


_STAGES: dict[str, StageInfo] = {}


def register(info: StageInfo) -> StageInfo:
    """Add a stage; a second registration under the same name must be identical."""
    old = _STAGES.get(info.name)
    if old is not None and old != info:
        raise ValueError(f"stage {info.name!r} is registered twice with different settings")
    _STAGES[info.name] = info
    return info


def _load() -> None:
    import medpretrain.methods  # noqa: F401  (importing the package registers every method module)


def all_stages() -> dict[str, StageInfo]:
    """Every training stage by name, generator-only ones included (the experiment's stage sections):
    self-supervised methods first, then generative models."""
    _load()
    order = sorted(_STAGES.values(), key=lambda s: (s.kind != "selfsup", list(_STAGES).index(s.name)))
    return {s.name: s for s in order}


def stages() -> dict[str, StageInfo]:
    """Every training stage that exports a backbone (what ``--init <name>`` and the grids' arms can use), in the
    order of :func:`all_stages`."""
    return {n: s for n, s in all_stages().items() if s.exports_backbone}


def stage(name: str) -> StageInfo:
    """The stage called ``name`` (generator-only stages included); ``KeyError`` naming the known ones."""
    all_ = all_stages()
    if name not in all_:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(all_)}")
    return all_[name]


def selfsup_methods() -> tuple[str, ...]:
    """Self-supervised methods (``--init selfsup`` takes the newest export of any of these)."""
    return tuple(n for n, s in stages().items() if s.kind == "selfsup")


def generative_models() -> tuple[str, ...]:
    """Generative stages that export a backbone (the generative ``--init`` arms; the DDPM is not one)."""
    return tuple(n for n, s in stages().items() if s.kind == "generative")


def generators() -> dict[str, str]:
    """Stages that can draw samples (generator-only ones included), and the file in their run folder that does it."""
    return {n: s.products["generator"] for n, s in all_stages().items() if "generator" in s.products}


register(StageInfo("vae", "generative", "generative/vae.py", "configs/vae.yaml", "runs/generative/vae",
                   {"generator": "decoder.safetensors"}, "variational auto-encoder; its encoder trunk is exported",
                   schema="medpretrain.generative.configs:VAEConfig"))
register(StageInfo("dcgan", "generative", "generative/dcgan.py", "configs/dcgan.yaml", "runs/generative/dcgan",
                   {"generator": "generator.safetensors"}, "DCGAN; its discriminator trunk is exported",
                   schema="medpretrain.generative.configs:DCGANConfig"))
register(StageInfo("ddpm", "generative", "generative/ddpm.py", "configs/ddpm.yaml", "runs/generative/ddpm",
                   {"generator": "unet.safetensors"}, "DDPM (diffusers UNet, DDIM sampling, EMA weights); "
                   "generator only, no backbone", schema="medpretrain.generative.configs:DDPMConfig",
                   exports_backbone=False))
