"""The backbone checkpoint: the one contract between pretraining, generative and fine-tuning stages.

A checkpoint is a safetensors file (never a pickle: nothing here calls ``torch.load``) whose header
metadata holds ``{"medpretrain": <JSON>, "medpretrain_kind": "backbone" | "state_dict"}``:

* backbones (:func:`save_backbone` / :func:`load_backbone`): the JSON is a :class:`BackboneMeta`, enough
  to rebuild the module (arch, in_channels, stem) and to reproduce its inputs (image_size, mean, std);
* whole models (:func:`save_state_dict` / :func:`load_state_dict`: classifier, U-Net, decoder): any JSON
  mapping the caller chooses.

Files are written atomically (:func:`medpretrain.utils.atomic_path`): a crash leaves the old file. Loading
is exact: missing or unexpected keys, or shape differences, raise ``ValueError`` listing them (MoCo's
``main_lincls.py`` habit), never ``strict=False`` and a log line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from medpretrain.backbones import Backbone, build_backbone, check_image_size
from medpretrain.utils import atomic_path, code_version

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY = "medpretrain"
KIND_KEY = "medpretrain_kind"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A file is not a readable medpretrain checkpoint (message names the file and the reason)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclasses.dataclass
class BackboneMeta:
    """Everything a later stage needs to rebuild and feed a backbone.

    ``method``: ``scratch``, ``imagenet``, ``simclr``, ``moco``, ``vae``, ``dcgan``, ``finetune`` ...
    ``dataset``: the data spec string it was trained on; ``dataset_hash`` its fingerprint.
    ``mean``/``std``: the input normalisation (a float, or one per channel).
    ``created``: ISO-8601 UTC time of the export (used to find the newest export of a method).
    ``config``: the resolved run config (:func:`medpretrain.config.config_to_dict`).
    """

    arch: str
    in_channels: int
    stem: str
    image_size: int | None = None
    mean: float | list[float] = 0.5
    std: float | list[float] = 0.5
    method: str = "scratch"
    dataset: str = ""
    dataset_hash: str = ""
    epochs: int = 0
    steps: int = 0
    code_version: str = dataclasses.field(default_factory=code_version)
    created: str = dataclasses.field(default_factory=_utc_now)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike[str] = "<dict>") -> BackboneMeta:
        """Rebuild from JSON. Unknown keys (from a newer writer) are kept under ``extra["_unknown"]``.

        Raises :class:`CheckpointError` naming ``source`` for missing required fields or a newer format.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"arch", "in_channels", "stem"} - set(data))
        if missing:
            raise CheckpointError(source, f"backbone metadata lacks {missing}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                source, f"format_version {version!r} is newer than this code reads ({FORMAT_VERSION}); update"
            )
        known = {k: v for k, v in data.items() if k in fields}
        unknown = {k: v for k, v in data.items() if k not in fields}
        meta = cls(**known)
        if unknown:
            meta.extra = {**meta.extra, "_unknown": unknown}
        return meta


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _cpu_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or non-contiguous storage)."""
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def _write(path: str | os.PathLike[str], tensors: dict[str, Tensor], kind: str, meta: Mapping[str, Any]) -> Path:
    header = {META_KEY: json.dumps(meta, sort_keys=True, default=_json_default), KIND_KEY: kind, "format": "pt"}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    log.info("wrote %s (%s, %d tensors)", path, kind, len(tensors))
    return Path(path)


def _read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a safetensors header; errors name the file. Checks the file is not truncated."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(p, f"not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(p, "not a safetensors file (bad header length); was it saved with torch.save?")
            raw = fh.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: checkpoint file not found") from None
    except IsADirectoryError:
        raise CheckpointError(p, "is a directory, not a checkpoint file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(p, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(p, "not a safetensors file (header is not a mapping)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(p, f"corrupt safetensors header entry {name!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(p, f"truncated: header promises {8 + n + end} bytes, file has {size}")
    return header


def _read_meta_dict(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    header = _read_header(path)
    md = header.get("__metadata__") or {}
    if META_KEY not in md:
        raise CheckpointError(path, f"safetensors file without '{META_KEY}' metadata: not a medpretrain checkpoint")
    if md.get(KIND_KEY, "backbone") != kind:
        raise CheckpointError(path, f"is a {md.get(KIND_KEY)!r} checkpoint, expected a {kind!r} checkpoint")
    try:
        meta = json.loads(md[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"'{META_KEY}' metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"'{META_KEY}' metadata is not a JSON object")
    return meta


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(path, f"cannot read tensors ({e})") from None


def load_exact(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str | os.PathLike[str],
    *,
    ignore: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Load ``state_dict`` into ``module`` asserting no missing and no unexpected keys and equal shapes.

    Keys in ``ignore`` must be present in ``state_dict`` and are dropped first (e.g. exactly
    ``{"fc.weight", "fc.bias"}``); an ``ignore`` key that is absent is an error too.
    Raises ``ValueError`` naming ``source`` and the differing keys / shapes.
    """
    absent = sorted(set(ignore) - set(state_dict))
    if absent:
        raise ValueError(f"{source}: expected keys {absent} to be present (to be dropped), they are not")
    state = {k: v for k, v in state_dict.items() if k not in ignore}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match {type(module).__name__}"
            f"{' ' + getattr(module, 'arch', '') if hasattr(module, 'arch') else ''}: "
            f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}" for k, v in own.items()
              if tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"{source}: tensor shapes differ: {'; '.join(shapes[:10])}")
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


# ------------------------------------------------------------------------------------------------
# Backbones
# ------------------------------------------------------------------------------------------------


def save_backbone(path: str | os.PathLike[str], backbone: Backbone, meta: BackboneMeta) -> Path:
    """Write ``backbone``'s weights and ``meta`` atomically to a safetensors file at ``path``.

    Raises ``ValueError`` if ``meta.arch / in_channels / stem`` disagree with the module (a file that
    lies about its architecture would fail far from here).
    """
    for name in ("arch", "in_channels", "stem"):
        if getattr(backbone, name) != getattr(meta, name):
            raise ValueError(
                f"save_backbone({path}): meta.{name}={getattr(meta, name)!r} but the backbone has "
                f"{name}={getattr(backbone, name)!r}"
            )
    return _write(path, _cpu_tensors(backbone.state_dict()), "backbone", meta.to_dict())


def read_meta(path: str | os.PathLike[str]) -> BackboneMeta:
    """Read only the :class:`BackboneMeta` of a backbone checkpoint (cheap: the header).

    Raises ``FileNotFoundError``, or :class:`CheckpointError` (a ``ValueError``) naming the file when it is
    not safetensors, is truncated, or has no medpretrain backbone metadata.
    """
    return BackboneMeta.from_dict(_read_meta_dict(path, "backbone"), source=path)


def load_backbone_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], BackboneMeta]:
    """Raw tensors and metadata of a backbone checkpoint (for adapters such as :mod:`medpretrain.init`)."""
    meta = read_meta(path)
    return _read_tensors(path), meta


def load_backbone(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
) -> tuple[Backbone, BackboneMeta]:
    """Rebuild the backbone stored at ``path`` and load its weights exactly.

    ``arch`` / ``in_channels``, when given, must equal the file's (``ValueError`` naming the file and
    both values). ``image_size``, when given, is checked against the architecture's minimum; a size
    different from the one it was trained at is allowed (logged), since the stem is fixed by the file.
    Raises :class:`CheckpointError` for unreadable files and ``ValueError`` for key mismatches.
    """
    state, meta = load_backbone_state(path)
    if arch is not None and arch != meta.arch:
        raise CheckpointError(path, f"checkpoint holds arch {meta.arch!r}, but arch {arch!r} was requested")
    if in_channels is not None and in_channels != meta.in_channels:
        raise CheckpointError(path, f"checkpoint has in_channels={meta.in_channels}, but in_channels={in_channels} was requested"
        )
    if image_size is not None:
        check_image_size(meta.arch, meta.stem, image_size)
        if meta.image_size is not None and image_size != meta.image_size:
            log.warning("%s: trained at %s px (stem %s), now used at %s px", path, meta.image_size, meta.stem,
                        image_size)
    backbone = build_backbone(meta.arch, meta.in_channels, meta.stem)
    load_exact(backbone, state, path)
    return backbone, meta


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------


def save_state_dict(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], meta_dict: Mapping[str, Any]
) -> Path:
    """Write any model's ``state_dict`` plus a JSON-serialisable ``meta_dict`` atomically (safetensors)."""
    return _write(path, _cpu_tensors(state_dict), "state_dict", dict(meta_dict))


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state_dict`: ``(tensors on CPU, meta_dict)``.

    Raises ``FileNotFoundError`` or :class:`CheckpointError` naming the file. Load the tensors into a model
    with :func:`load_exact`.
    """
    meta = _read_meta_dict(path, "state_dict")
    return _read_tensors(path), meta


__all__ = [
    "FORMAT_VERSION",
    "BackboneMeta",
    "CheckpointError",
    "load_backbone",
    "load_backbone_state",
    "load_exact",
    "load_state_dict",
    "read_meta",
    "save_backbone",
    "save_state_dict",
]
