"""Names of everything that trains a backbone: the one list that ``--init``, the experiment runner, the grid
defaults and the benchmarks read.

Each entry says which entry script trains it, its default config, and the files its run folder holds
when it is done. Self-supervised methods register themselves from their own module under
:mod:`medpretrain.methods`; the generative models are listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class StageInfo:
    """A training stage whose run exports a contract backbone (``backbone.safetensors``)."""

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


def stages() -> dict[str, StageInfo]:
    """Every training stage by name: self-supervised methods first, then generative models."""
    _load()
    order = sorted(_STAGES.values(), key=lambda s: (s.kind != "selfsup", list(_STAGES).index(s.name)))
    return {s.name: s for s in order}


def stage(name: str) -> StageInfo:
    """The stage called ``name``; ``KeyError`` naming the known ones."""
    all_ = stages()
    if name not in all_:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(all_)}")
    return all_[name]


def selfsup_methods() -> tuple[str, ...]:
    """Self-supervised methods (``--init selfsup`` takes the newest export of any of these)."""
    return tuple(n for n, s in stages().items() if s.kind == "selfsup")


def generative_models() -> tuple[str, ...]:
    return tuple(n for n, s in stages().items() if s.kind == "generative")


def generators() -> dict[str, str]:
    """Generative stages that can draw samples, and the file in their run folder that does it."""
    return {n: s.products["generator"] for n, s in stages().items() if "generator" in s.products}


register(StageInfo("vae", "generative", "generative/vae.py", "configs/vae.yaml", "runs/generative/vae",
                   {"generator": "decoder.safetensors"}, "variational auto-encoder; its encoder trunk is exported",
                   schema="medpretrain.generative.configs:VAEConfig"))
register(StageInfo("dcgan", "generative", "generative/dcgan.py", "configs/dcgan.yaml", "runs/generative/dcgan",
                   {"generator": "generator.safetensors"}, "DCGAN; its discriminator trunk is exported",
                   schema="medpretrain.generative.configs:DCGANConfig"))
