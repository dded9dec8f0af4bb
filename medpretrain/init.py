"""Initialisations by name: ``scratch``, ``imagenet``, self-supervised / generative exports, or a file.

:func:`init_backbone` is what every fine-tuning run calls. It never falls back to random weights: a
missing ImageNet file raises :class:`ImageNetUnavailable`, a missing pretraining export raises
``FileNotFoundError`` naming the command that creates one.

ImageNet weights are torchvision's own files (``IMAGENET1K_V1``, e.g. ``resnet18-f37072fd.pth``), read
with ``torch.load(weights_only=True)`` (no arbitrary unpickling) from, in order:

1. the ``weights`` argument (a file, or a folder),
2. ``$MEDPRETRAIN_IMAGENET_WEIGHTS`` (a file or a folder),
3. ``../shared/weights/`` beside the project,
4. the torch hub cache (``torch.hub.get_dir()/checkpoints``, where torchvision downloads to).

Files named like torchvision's (``<name>-<hex>.pth``) are verified as torchvision's ``check_hash``
does: the sha256 of the content must start with ``<hex>``. In a folder the official name is preferred,
then any ``<name>-<hex>.pth`` (sorted). A file given directly under another name is used unverified;
its sha256 is recorded and a note says so.

Adaptations, all recorded in :attr:`InitInfo.notes`:

* 3-channel first conv -> 1 channel by **summing** over the input channels: a grey image ``g`` fed to
  the 1-channel conv then gives exactly the response of the RGB conv to ``(g, g, g)``; a mean would
  scale the first activations by 1/3 and detune the pretrained BatchNorm statistics after it.
* ``stem="small"`` with ImageNet weights (ResNet ``conv1``, DenseNet ``conv0``): the 7x7 kernel is
  **centre-cropped** to 3x3 and the stride becomes 1. This departs from the pretrained network (the
  crop keeps the central taps only); we accept it so the ImageNet arm can run on 28-64 px images, and
  the note makes it visible in every result. VGG's small stem changes no weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from medpretrain import backbones
from medpretrain.backbones import Backbone, build_backbone, resolve_stem, torchvision_head_prefixes
from medpretrain.checkpoint import BackboneMeta, CheckpointError, load_backbone_state, load_exact, read_meta
from medpretrain.config import ConfigError
from medpretrain.methods.registry import StageInfo, selfsup_methods, stages
from medpretrain.utils import PROJECT_ROOT, sha256_file

log = logging.getLogger(__name__)

ENV_WEIGHTS = "MEDPRETRAIN_IMAGENET_WEIGHTS"
SHARED_WEIGHTS_DIR = PROJECT_ROOT.parent / "shared" / "weights"
PRETRAIN_METHODS = tuple(stages())
"""Named inits resolved to the newest export of that method under ``runs_dir``: every registered training
stage (:mod:`medpretrain.methods.registry`; self-supervised methods first, then generative models)."""
SELFSUP_METHODS = selfsup_methods()
"""``init="selfsup"`` takes the newest export of any of these (every registered self-supervised method)."""
NAMED_INITS = ("scratch", "imagenet", "selfsup", *PRETRAIN_METHODS)
EXPORT_NAME = "backbone.safetensors"


def _create_command(name: str, info: StageInfo) -> str:
    method = f" method={name}" if Path(info.script).stem != name else ""  # the generic pretrain/train.py
    return f"python {info.script}{method}  (writes {info.out_dir}/<run>/{EXPORT_NAME})"


_CREATE_COMMAND = {name: _create_command(name, info) for name, info in stages().items()}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torchvision / torch.hub's HASH_REGEX
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class ImageNetUnavailable(FileNotFoundError):
    """No ImageNet weights file was found; the message lists every place looked and the file name."""


class WeightsHashMismatch(ValueError):
    """A weights file's sha256 does not start with the hash in its torchvision-style name."""


@dataclasses.dataclass
class InitInfo:
    """How a backbone was initialised, to be stored beside every result.

    ``name``: ``scratch``, ``imagenet``, or the method of the loaded export (``simclr`` ...).
    ``source``: the weights file, or ``"random"``. ``meta``: the export's metadata (None for scratch and
    ImageNet). ``sha256``: of the weights file (None for scratch). ``notes``: adaptations and caveats.
    """

    name: str
    source: str
    meta: BackboneMeta | None = None
    sha256: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["meta"] = self.meta.to_dict() if self.meta is not None else None
        return d


# ------------------------------------------------------------------------------------------------
# ImageNet
# ------------------------------------------------------------------------------------------------


def imagenet_weights(arch: str) -> list[torchvision.models.WeightsEnum]:
    """torchvision's ImageNet weight entries for ``arch``, ``IMAGENET1K_V1`` first.

    Raises ``ValueError`` for architectures without ImageNet weights (the CBR nets).
    """
    if arch not in backbones.torchvision_archs():
        raise ConfigError(
            f"no ImageNet weights exist for {arch!r}; ImageNet init is available for {backbones.torchvision_archs()}"
        )
    entries = list(torchvision.models.get_model_weights(arch))
    return sorted(entries, key=lambda w: (w.name != "IMAGENET1K_V1", w.name))


def imagenet_file_names(arch: str) -> list[str]:
    """Official file names, preferred first (e.g. ``["resnet18-f37072fd.pth"]``)."""
    return [w.url.rsplit("/", 1)[-1] for w in imagenet_weights(arch)]


def _name_prefix(file_name: str) -> str:
    """``resnet18-f37072fd.pth`` -> ``resnet18``; ``inception_v3_google-0cc3c7bd.pth`` -> ``inception_v3_google``."""
    return file_name.rsplit("-", 1)[0]


def _candidates_in(folder: Path, arch: str) -> list[Path]:
    official = imagenet_file_names(arch)
    found = [folder / n for n in official if (folder / n).is_file()]
    prefixes = {_name_prefix(n) for n in official}
    pattern = re.compile(rf"^({'|'.join(map(re.escape, sorted(prefixes)))})-[0-9a-f]{{8,}}\.pth$")
    others = sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name) and p not in found)
    return found + others


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_imagenet_weights(arch: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """Locate the ImageNet weights file for ``arch`` (order in the module docstring).

    Raises :class:`ImageNetUnavailable` listing every place looked and the file name to put there.
    """
    official = imagenet_file_names(arch)
    looked: list[str] = []

    def search(where: str, p: Path) -> Path | None:
        if p.is_file():
            return p
        if p.is_dir():
            found = _candidates_in(p, arch)
            if found:
                return found[0]
            looked.append(f"{where}: {p} (no {official[0]} or {_name_prefix(official[0])}-<sha256 prefix>.pth)")
        else:
            looked.append(f"{where}: {p} (does not exist)")
        return None

    if weights is not None:
        hit = search("weights argument", Path(weights).expanduser())
        if hit is not None:
            return hit
        # An explicitly requested file that is absent is an error, not a cue to use some other file.
        raise ImageNetUnavailable(_unavailable_message(arch, official, looked))
    looked.append("weights argument: not given")
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        hit = search(f"${ENV_WEIGHTS}", Path(env).expanduser())
        if hit is not None:
            return hit
    else:
        looked.append(f"${ENV_WEIGHTS}: not set")
    for where, folder in (("shared weights folder", SHARED_WEIGHTS_DIR), ("torch hub cache", _hub_checkpoints_dir())):
        hit = search(where, folder)
        if hit is not None:
            return hit
    raise ImageNetUnavailable(_unavailable_message(arch, official, looked))


def _unavailable_message(arch: str, official: list[str], looked: list[str]) -> str:
    url = imagenet_weights(arch)[0].url
    return (
        f"ImageNet weights for {arch} not found (this environment cannot download them). Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nPut {official[0]} (from {url}) into {SHARED_WEIGHTS_DIR} or the torch hub cache, "
        f"or point ${ENV_WEIGHTS} or weights= at it. Not falling back to random weights."
    )


def verify_weights_file(path: Path, arch: str) -> tuple[str, list[str]]:
    """Return ``(sha256, notes)``; check the hash prefix when the name is torchvision-style.

    Raises :class:`WeightsHashMismatch` naming the file, both hashes and the download URL.
    """
    digest = sha256_file(path)
    official = imagenet_file_names(arch)
    prefixes = {_name_prefix(n) for n in official}
    match = _HASH_IN_NAME.search(path.name)
    if match is None or _name_prefix(path.name) not in prefixes or not path.name.endswith(".pth"):
        return digest, [f"{path.name} is not a torchvision file name ({official[0]}): hash not verified, "
                        f"sha256 {digest} recorded"]
    expected = match.group(1)
    if not digest.startswith(expected):
        raise WeightsHashMismatch(
            f"{path}: sha256 {digest[:16]}... does not start with {expected!r} from its file name: the file is "
            f"corrupt, truncated or renamed. Re-download {imagenet_weights(arch)[0].url}"
        )
    notes = []
    if path.name not in official:
        notes.append(f"{path.name} matches its own name's hash but is not torchvision's official file {official[0]}")
    return digest, notes


def read_torchvision_state(path: Path) -> dict[str, Tensor]:
    """``torch.load(weights_only=True)`` a torchvision state dict; rename DenseNet's pre-0.3 keys.

    Raises ``ValueError`` naming the file if it does not hold a mapping of names to tensors.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with non-tensor objects, a zip error, a truncated file ...
        raise CheckpointError(path, f"cannot read as a torch state dict with weights_only=True ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(path, f"expected a mapping of parameter names to tensors, got {type(obj).__name__}")
    state: dict[str, Tensor] = {}
    for k, v in obj.items():
        m = _DENSENET_OLD_KEY.match(k)  # as torchvision.models.densenet._load_state_dict does
        state[m.group(1) + m.group(2) if m else k] = v
    return state


def _torchvision_head_keys(arch: str) -> set[str]:
    """Exactly the classifier keys of torchvision's full model (ImageNet files include aux logits)."""
    with torch.device("meta"):
        if arch == "inception_v3":
            full = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        else:
            full = torchvision.models.get_model(arch, weights=None)
    return {k for k in full.state_dict() if k.startswith(torchvision_head_prefixes(arch))}


def adapt_first_conv(weight: Tensor, target_shape: torch.Size | tuple[int, ...], notes: list[str]) -> Tensor:
    """Adapt a first-conv kernel ``[O, I, k, k]`` to ``target_shape`` (see module docstring).

    3 -> 1 input channels: sum over dim 1. k -> t (k > t, same parity): centre crop. Anything else is
    returned unchanged (the exact loader then reports the shape difference).
    """
    out_c, in_c, kh, kw = target_shape
    if weight.shape[1] == 3 and in_c == 1:
        weight = weight.sum(dim=1, keepdim=True)
        notes.append("first conv: 3 input channels summed to 1 (grey input = RGB response to (g, g, g))")
    if weight.shape[2:] != (kh, kw) and weight.shape[2] > kh and (weight.shape[2] - kh) % 2 == 0:
        top, left = (weight.shape[2] - kh) // 2, (weight.shape[3] - kw) // 2
        notes.append(
            f"first conv: {weight.shape[2]}x{weight.shape[3]} kernel centre-cropped to {kh}x{kw} for the small stem "
            "(departure from the pretrained network)"
        )
        weight = weight[:, :, top : top + kh, left : left + kw]
    return weight.contiguous()


def _load_imagenet(
    arch: str, in_channels: int, stem: str, weights: str | os.PathLike[str] | None
) -> tuple[Backbone, InitInfo]:
    backbone = build_backbone(arch, in_channels, stem)
    path = find_imagenet_weights(arch, weights)
    digest, notes = verify_weights_file(path, arch)
    state = read_torchvision_state(path)
    entry = next((w for w in imagenet_weights(arch) if w.url.rsplit("/", 1)[-1] == path.name), None)
    notes.insert(0, f"torchvision {type(entry).__name__}.{entry.name}" if entry else f"torchvision {arch} key layout")
    own = backbone.state_dict()
    key = backbone.first_conv_key
    if key in state:
        state[key] = adapt_first_conv(state[key], own[key].shape, notes)
    # Files older than PyTorch 0.4.1 lack BatchNorm's counter; torch's own loader fills it with 0 too.
    absent_counters = [k for k in own if k.endswith(".num_batches_tracked") and k not in state]
    for k in absent_counters:
        state[k] = torch.zeros((), dtype=torch.long)
    if absent_counters:
        notes.append(f"{len(absent_counters)} BatchNorm num_batches_tracked counters absent in the file, set to 0")
    load_exact(backbone, state, path, ignore=_torchvision_head_keys(arch))
    log.info("ImageNet init of %s from %s", arch, path)
    return backbone, InitInfo("imagenet", str(path), None, digest, notes)


# ------------------------------------------------------------------------------------------------
# Pretraining exports and files
# ------------------------------------------------------------------------------------------------


def _created_key(meta: BackboneMeta, path: Path) -> tuple[datetime, float, str]:
    try:
        created = datetime.fromisoformat(meta.created)
    except (TypeError, ValueError):
        created = datetime.min
    if created.tzinfo is not None:  # compare in naive UTC
        created = created.astimezone(timezone.utc).replace(tzinfo=None)
    return created, path.stat().st_mtime, str(path)


def find_latest_export(runs_dir: str | os.PathLike[str], methods: Iterable[str], arch: str | None = None) -> Path:
    """Newest ``backbone.safetensors`` under ``runs_dir`` (recursively) whose ``meta.method`` is in
    ``methods`` (and ``meta.arch == arch`` when given).

    "Newest" is by ``meta.created`` (the export time written into the file, robust to copies that change
    mtimes), then file mtime, then path. Unreadable files are skipped with a warning. A relative
    ``runs_dir`` resolves against the project root, as the pretraining scripts' ``out_dir`` does.
    Raises ``FileNotFoundError`` saying which command creates an export.
    """
    methods = tuple(methods)
    root = Path(runs_dir).expanduser()
    if not root.is_absolute():
        root = PROJECT_ROOT / root
    found: list[tuple[tuple[datetime, float, str], Path]] = []
    other_archs: list[str] = []
    for p in sorted(root.rglob(EXPORT_NAME)) if root.is_dir() else []:
        try:
            meta = read_meta(p)
        except (CheckpointError, OSError) as e:
            log.warning("skipping unreadable export %s: %s", p, e)
            continue
        if meta.method not in methods:
            continue
        if arch is not None and meta.arch != arch:
            other_archs.append(f"{p} ({meta.arch})")
            continue
        found.append((_created_key(meta, p), p))
    if not found:
        how = "; ".join(f"{m}: {_CREATE_COMMAND[m]}" for m in methods if m in _CREATE_COMMAND)
        also = f" Exports of other architectures: {', '.join(other_archs)}." if other_archs else ""
        raise FileNotFoundError(
            f"no {'/'.join(methods)} backbone export{' for ' + arch if arch else ''} under {root.resolve()} "
            f"(searched **/{EXPORT_NAME}).{also} Create one with {how}"
        )
    return max(found)[1]


def _load_export(
    path: Path, arch: str, in_channels: int, stem: str, image_size: int | None
) -> tuple[Backbone, InitInfo]:
    state, meta = load_backbone_state(path)
    if meta.arch != arch:
        raise CheckpointError(path, f"checkpoint holds arch {meta.arch!r}, but arch {arch!r} was requested")
    if stem != "auto" and resolve_stem(stem, image_size, arch) != meta.stem:
        raise CheckpointError(path, f"checkpoint was built with stem={meta.stem!r}, but stem={stem!r} was requested; "
            f"use stem={meta.stem!r} or 'auto'"
        )
    notes: list[str] = []
    if in_channels == meta.in_channels:
        pass
    elif meta.in_channels == 3 and in_channels == 1:
        pass  # adapted below by summing, as for ImageNet
    else:
        raise CheckpointError(path, f"checkpoint has in_channels={meta.in_channels}, but in_channels={in_channels} was requested "
            "(only 3 -> 1 is adapted, by summing the first conv over its input channels)"
        )
    if image_size is not None:
        backbones.check_image_size(arch, meta.stem, image_size)
        if meta.image_size is not None and meta.image_size != image_size:
            notes.append(f"pretrained at {meta.image_size} px, used at {image_size} px")
    backbone = build_backbone(arch, in_channels, meta.stem)
    key = backbone.first_conv_key
    if key in state:
        state[key] = adapt_first_conv(state[key], backbone.state_dict()[key].shape, notes)
    load_exact(backbone, state, path)
    info = InitInfo(meta.method, str(path), meta, sha256_file(path), notes)
    log.info("init %s from %s (method %s, created %s)", info.name, path, meta.method, meta.created)
    return backbone, info


def init_backbone(
    init: str,
    arch: str,
    in_channels: int,
    stem: str,
    *,
    image_size: int | None,
    weights: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
) -> tuple[Backbone, InitInfo]:
    """Build ``arch`` and initialise it by name (see module docstring).

    ``init``: ``scratch`` (torchvision's default init; seed with :func:`medpretrain.utils.seed_everything`
    first), ``imagenet``, a registered stage (:data:`PRETRAIN_METHODS`: ``simclr``, ``moco``, ``byol`` ...,
    ``vae``, ``dcgan``: the newest export of that method and arch under ``runs_dir``, relative to the project
    root), ``selfsup`` (newest of any self-supervised method, :data:`SELFSUP_METHODS`), or a
    path to a backbone checkpoint. ``stem``: ``standard``, ``small`` or ``auto`` (resolved with ``image_size``; a loaded
    export keeps its own stem).

    Raises :class:`ImageNetUnavailable`, :class:`WeightsHashMismatch`, ``FileNotFoundError`` (no export /
    no such file), ``ValueError`` (incompatible arch, channels, stem, size, keys). Never returns random
    weights for a pretrained init.
    """
    if weights is not None and init != "imagenet":
        log.warning("weights=%s is only used by init='imagenet'; ignored for init=%r", weights, init)
    if init in ("scratch", "imagenet"):
        resolved = resolve_stem(stem, image_size, arch)
        if image_size is not None:
            backbones.check_image_size(arch, resolved, image_size)
        if init == "scratch":
            backbone = build_backbone(arch, in_channels, resolved)
            return backbone, InitInfo("scratch", "random", None, None, ["torchvision default init"])
        return _load_imagenet(arch, in_channels, resolved, weights)
    if init in PRETRAIN_METHODS or init == "selfsup":
        methods = SELFSUP_METHODS if init == "selfsup" else (init,)
        path = find_latest_export(runs_dir, methods, arch)
        return _load_export(path, arch, in_channels, stem, image_size)
    path = Path(init).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"init {init!r} is neither one of {list(NAMED_INITS)} nor an existing checkpoint file"
        )
    return _load_export(path, arch, in_channels, stem, image_size)


__all__ = [
    "ENV_WEIGHTS",
    "ImageNetUnavailable",
    "InitInfo",
    "WeightsHashMismatch",
    "adapt_first_conv",
    "find_imagenet_weights",
    "find_latest_export",
    "imagenet_file_names",
    "imagenet_weights",
    "init_backbone",
    "read_torchvision_state",
    "verify_weights_file",
]
