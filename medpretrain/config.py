"""Typed configuration: one dataclass per entry point, YAML files and command-line overrides on top.

The contract (nanoGPT's configurator, made strict):

* defaults live in a dataclass (nested dataclasses for groups such as ``data`` or ``optim``);
* ``--config file.yaml`` (or a first positional ``*.yaml``) is applied over the defaults;
* any key can then be overridden as ``key=value``, ``--key value`` or ``--key=value``; nested keys are
  dotted (``data.image_size=64``). Values are parsed as YAML scalars (``1e-3``, ``true``, ``[1, 2]``);
* an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key, before any
  work starts;
* :func:`save_config` writes the resolved config next to every output; checkpoints embed
  :func:`config_to_dict`.

YAML is always read with ``yaml.safe_load``: a config can never construct Python objects.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid: unknown key, wrong type or unreadable file."""


# --------------------------------------------------------------------------------------------
# Shared groups. Entry points compose these into their own dataclass (DINO's parent parsers).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    """Which data, and how it is turned into tensors. See :mod:`medpretrain.data` for spec strings."""

    dataset: str = "medmnist:pneumoniamnist"
    """Dataset spec: ``medmnist:<name>[@size]``, ``folder:<path>``, ``manifest:<file.csv>``, ``dicom:<path>``,
    ``nifti:<path>``, ``segpairs:<images>,<masks>[,<roi>]``, ``drive:[<path>]`` (DRIVE with its official split).
    Relative paths resolve against ``root``."""
    root: str | None = None
    """Data root; ``None`` means ``$MEDPRETRAIN_DATA``, else ``../shared/data`` next to the project."""
    image_size: int | None = None
    """Resize to this square size; ``None`` keeps the source size (MedMNIST) or 224 for files."""
    channels: int = 1
    """1 (grey; RGB files are converted) or 3."""
    mean: float = 0.5
    """Normalisation applied after scaling to [0, 1]: ``(x - mean) / std`` (stored in checkpoints)."""
    std: float = 0.5
    val_fraction: float = 0.1
    """Used only when the source has no official validation split."""
    test_fraction: float = 0.2
    """Used only when the source has no official test split."""
    split_seed: int = 0
    label_fraction: float | None = None
    """Fraction of the training labels to keep, drawn stratified (1.0 = all)."""
    labels_per_class: int | None = None
    """Alternative to ``label_fraction``: this many training labels per class."""
    subset_seed: int | None = None
    """Seed of the label subset (``label_fraction`` / ``labels_per_class``). ``None``: the run's seed
    (fine-tuning's ``seed``), so every seed draws its own subset, of the same size and class counts, from
    the same training split (the split itself follows ``split_seed``); without a run seed, ``split_seed``."""
    dedup: Literal["pixels", "phash", "none"] = "pixels"
    """Near-duplicate grouping before splitting (``folder:`` and ``segpairs:`` sources; sources with an
    official split and DICOM / NIfTI / MedMNIST ignore it): ``pixels`` (RMS difference of 32x32 grey
    thumbnails), ``phash`` (perceptual hash, Hamming distance) or ``none``. See
    :mod:`medpretrain.data.duplicates`."""
    dedup_threshold: float | None = None
    """Largest distance that makes two images near-duplicates; ``None``: 0.05 (``pixels``) or 8 bits
    (``phash``)."""
    group_regex: str | None = None
    """Group key from each sample's path (relative to the dataset folder, e.g. ``benign/sub-01_a.png``):
    ``re.search``'s group ``group``, else its first group, else (no group, or one outside the matching
    alternative) the whole match, e.g.
    ``(?P<group>sub-\\d+)_``. A path it does not match is a DataError naming it. Combines with patient keys
    and near-duplicates."""
    cv_folds: int = 0
    """k-fold cross-validation when > 1: fold ``cv_fold`` is the test set, ``val_fraction`` of the rest
    validates (grouped and stratified); ``test_fraction`` is then unused. 0 = a single split."""
    cv_fold: int = 0
    """Which fold (0..cv_folds-1) is the test set."""
    skip_bad: bool = False
    """Skip unreadable files (counted and reported) instead of failing on the first one."""
    max_pixels: int = 2**28
    """Largest image a reader decodes: pixels of an image file or DICOM frame, voxels of a NIfTI volume,
    checked from the header before decoding; a larger file is a DataError naming it (a decompression bomb
    or a wrong file). 0 = no limit. 2**28 admits a 16384x16384 image or a 512x512x1024 CT volume."""
    num_workers: int = 0
    download: bool = False
    """MedMNIST only: download through the ``medmnist`` package when the file is missing (needs a network)."""
    # DICOM / NIfTI specifics.
    window: str = "auto"
    """DICOM intensity window: ``auto`` (VOI LUT or window centre/width, else min-max), ``minmax``,
    or ``<centre>,<width>``."""
    slice_axis: int = 2
    """NIfTI: axis along which 3D volumes are cut into 2D slices."""
    # Manifests (``manifest:<file>``, ``folder:<file.csv>``): column names. See :mod:`medpretrain.data.manifest`.
    path_column: str = "image_path"
    """Manifest column of each row's file (image, DICOM or NIfTI), relative to the manifest's folder or absolute."""
    label_column: str = "label"
    """Manifest column of single labels: class names, or integer indices 0..K-1. Optional at the default
    (a manifest without it is unlabeled); another name must exist."""
    label_columns: list[str] | None = None
    """Manifest columns of a multi-label task, one per finding, each 0 or 1 (e.g. the 14 of a chest X-ray
    set): labels become float multi-hot vectors in this order; replaces ``label_column``."""
    classes: list[str] | None = None
    """Manifest class names in index order; a label that is not one of them is an error naming the row.
    ``None``: the sorted distinct labels."""
    patient_column: str = "patient"
    """Manifest column of patient / subject ids: one patient never spans two splits; ids are kept only as
    salted keys (as DICOM PatientID). Optional at the default; another name must exist."""
    split_column: str | None = None
    """Manifest column of official splits (``train`` / ``val`` / ``test``); ``None``: split by
    ``val_fraction`` / ``test_fraction``."""
    # Retinal preprocessing, ``segpairs:`` / ``drive:`` only (another source refuses them); at native size,
    # before ``image_size``. See :mod:`medpretrain.data.retina`.
    rgb_to_grey: Literal["luma", "green"] = "luma"
    """How an RGB image becomes grey: ``luma`` (ITU-R 601; with ``channels: 3`` RGB stays RGB) or ``green`` (the
    green channel, where retinal vessels contrast most; repeated into three channels when ``channels`` is 3)."""
    clahe: bool = False
    """Contrast-limited adaptive histogram equalisation of each channel after the grey conversion (kornia's
    ``equalize_clahe``, OpenCV's algorithm)."""
    clahe_clip: float = 2.0
    """CLAHE clip limit, as OpenCV's ``clipLimit`` (2.0 is the usual choice for fundus images; 0: no clipping)."""
    clahe_grid: int = 8
    """CLAHE tiles per side (OpenCV's ``tileGridSize``)."""
    derive_fov: bool = False
    """A source without roi files (``segpairs:<images>,<masks>``) gets a field-of-view roi derived from each image:
    red channel above ``fov_threshold``, largest region, holes filled, eroded by 1 px. Given rois are kept."""
    fov_threshold: float = 0.1
    """Red-channel level (of [0, 1]) above which a pixel is inside the derived field of view."""
    # On-disk image cache (``folder:``, ``manifest:``, ``dicom:``, ``nifti:``). See :mod:`medpretrain.data.cache`.
    cache: bool | Literal["auto"] = False
    """``off`` (false): decode into memory (float32). ``on`` (true): decode once, in parallel, into a memory-mapped cache of
    uint8 (8-bit image files) / uint16 pixels that every stage and run re-uses; training reads one image at a
    time. Quantised after resizing: at most 0.5/255 or 0.5/65535 per pixel from the in-memory values. ``auto``:
    ``on`` when the decoded float32 set (one sample per file) would exceed ``cache_above_mb``."""
    cache_dir: str | None = None
    """Cache folder; ``None``: ``$MEDPRETRAIN_CACHE``, else ``runs/cache`` in the project. Relative paths resolve
    against the project."""
    cache_workers: int | None = None
    """Processes decoding into the cache; ``None``: min(4, CPU count)."""
    cache_above_mb: int = 2048
    """``cache: auto`` caches sources whose decoded float32 images would take more than this many MB."""
    stream: bool = False
    """Read images lazily, file by file, in the DataLoader workers (``folder:``, ``manifest:``, ``dicom:``,
    ``nifti:``; needs ``cache: off``). The files are first indexed once, in ``cache_workers`` processes, into
    ``cache_dir`` (sample counts, salted group keys, thumbnails and errors: a few KB per file, re-used by every
    run), so splits, names and unreadable-file errors are those of the in-memory path; then every access
    decodes and resizes its file again, giving pixel-identical float32 images. See :mod:`medpretrain.data.stream`.

    Which to use: **memory** (``cache: off``, the default) while the decoded float32 set fits in RAM
    (``N x C x size^2 x 4`` bytes): it decodes once per process and is the fastest, with
    ``train.cache_on_device`` on in pretraining. **cache** (``cache: on`` / ``auto``) when it does not fit but
    ``N x C x size^2 x 2`` bytes (uint16; 1 for 8-bit files) fit on disk: decoded once for all runs, read from
    memory maps with bounded memory. **stream** when neither fits, or for a one-off look at a large set: memory
    and disk stay small, but every epoch decodes every file again, so it needs ``num_workers`` > 0 to keep up,
    and a multi-frame file or volume is decoded whole for each of its samples. With ``cache`` or ``stream``, set
    ``train.cache_on_device: false`` (pretraining) so the split is not stacked into one tensor."""
    # Synthetic training images (fine-tuning, classification only). See :mod:`medpretrain.data.synthetic`.
    synthetic: str = ""
    """A ``samples.npz`` of class-conditional synthetic images (``images``, ``labels``; ``generative/sample.py
    per_class=<n>``) added to the label budget's training images, never to validation or test; relative paths
    resolve against the working directory. In an experiment, ``stage:<generator>[:<n per class>]`` names the
    samples of that generator stage. Empty: none."""
    synthetic_ratio: float = 0.0
    """Per class, ``round_half_up(ratio x real training images of that class in the label subset)`` synthetic
    images of that class, drawn without replacement by the run's seed."""
    synthetic_per_class: int | None = None
    """Instead of ``synthetic_ratio``: this many synthetic images of every class."""

    def __post_init__(self) -> None:
        if self.synthetic_ratio < 0 or (self.synthetic_per_class is not None and self.synthetic_per_class < 0):
            raise ConfigError(f"data.synthetic_ratio and data.synthetic_per_class must be >= 0, got "
                              f"{self.synthetic_ratio} and {self.synthetic_per_class}")
        if self.synthetic_ratio > 0 and self.synthetic_per_class is not None:
            raise ConfigError("set either data.synthetic_ratio or data.synthetic_per_class, not both")
        adds = self.synthetic_ratio > 0 or self.synthetic_per_class is not None
        if adds and not self.synthetic:
            raise ConfigError("data.synthetic_ratio / data.synthetic_per_class need data.synthetic (a samples.npz)")
        if self.synthetic and not adds:
            raise ConfigError(f"data.synthetic={self.synthetic!r} adds nothing: set data.synthetic_ratio or "
                              "data.synthetic_per_class")
        if self.clahe_clip < 0 or self.clahe_grid < 1:
            raise ConfigError(f"data.clahe_clip must be >= 0 and data.clahe_grid >= 1, got {self.clahe_clip} and "
                              f"{self.clahe_grid}")
        if not 0.0 <= self.fov_threshold < 1.0:
            raise ConfigError(f"data.fov_threshold must be in [0, 1), got {self.fov_threshold}")


@dataclasses.dataclass
class BackboneConfig:
    arch: str = "resnet18"
    """Registered architecture, see :func:`medpretrain.backbones.available_backbones`."""
    stem: str = "auto"
    """``standard`` (7x7 stride 2 + max-pool), ``small`` (3x3 stride 1, no pool; for 28-64 px) or
    ``auto`` (small below 96 px)."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of the conv weights and activations: ``auto`` puts networks with depthwise convolutions
    (EfficientNet, MobileNet) in ``channels_last`` (on this 2-core CPU an EfficientNet-Lite0 step at 48 px takes
    half the time) and keeps the others contiguous (ResNet-18 at 28 px is 1.5x slower in channels_last)."""


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating.
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is not None:  # list[int], Literal['a', 'b'], int | None
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError. Ints are accepted where floats are."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. init=5 would be odd, but a path "2024" is legitimate
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config class (cached: a grid resolves thousands of cell configs)."""
    return typing.get_type_hints(cls)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of config dataclass ``cls``, dotted (``data.image_size``), groups included."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        keys.append(prefix + f.name)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _nearest_key(key: str, cls: type, prefix: str) -> str | None:
    """The valid key nearest to ``key`` (difflib over last parts): a sibling first (``train.epoch`` ->
    ``train.epochs``), else one in a group below (``lr`` -> ``optim.lr``)."""
    leaf = key.rsplit(".", 1)[-1]
    siblings = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    match = difflib.get_close_matches(leaf, siblings, n=1)
    if match:
        return prefix + match[0]
    below: dict[str, str] = {}
    for k in _dotted_keys(cls, prefix):
        below.setdefault(k.rsplit(".", 1)[-1], k)
    match = difflib.get_close_matches(leaf, list(below), n=1)
    return below[match[0]] if match else None


def _unknown_keys_message(unknown: list[str], cls: type, prefix: str) -> str:
    """``unknown config key 'train.epoch' (did you mean 'train.epochs'?)``, one line for any number of keys;
    without any suggestion the valid keys of that level are listed."""
    parts, suggested = [], False
    for key in unknown:
        near = _nearest_key(key, cls, prefix)
        suggested = suggested or near is not None
        parts.append(f"'{key}'" + (f" (did you mean '{near}'?)" if near else ""))
    text = f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}"
    if not suggested:
        text += f"; valid keys here: {', '.join(prefix + f.name for f in dataclasses.fields(cls))}"  # type: ignore[arg-type]
    return text


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (partial) mapping, validating every key and type."""
    hints = _hints(cls)  # type: ignore[arg-type]  # a class is hashable; mypy reads type[T] as any T
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_unknown_keys_message([prefix + k for k in unknown], cls, prefix))
    values = dict(values)
    for name, v in values.items():  # a section given in part keeps the defaults its field's factory sets
        factory = fields[name].default_factory
        if isinstance(v, dict) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                values[name] = _merge(dataclasses.asdict(default), v)
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON view of a config dataclass (for checkpoints, results and ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file. The same text is parsed once (a grid
    resolves the same few files for each of its cells); callers get their own copy."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror or e})") from None
    try:
        data = copy.deepcopy(_safe_load(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None  # one line
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=256)
def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, cached (callers copy the result before handing it out)."""
    return yaml.safe_load(text)


def _dotted_to_nested(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``). Mappings only in
    braces: ``drive:`` or ``folder:a: b`` stay strings (dataset specs end in or contain colons)."""
    try:
        value = _safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    return copy.deepcopy(value)


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split argv into config files and a nested override mapping.

    Accepts ``--config F`` (repeatable), bare ``*.yaml`` paths, ``key=value``, ``--key value``
    and ``--key=value``. A ``--flag`` followed by another ``--`` option or nothing means ``true``.
    """
    files: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(0)  # handled by load_config, which prints help first
        if arg == "--config" or arg == "-c":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
            i += 1
            continue
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
                i += 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, text = body, argv[i + 1]
                i += 2
            else:
                key, text = body, "true"
                i += 1
        elif "=" in arg:
            key, text = arg.split("=", 1)
            i += 1
        elif arg.endswith((".yaml", ".yml")):
            files.append(arg)
            i += 1
            continue
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: use key=value, --key value or --config file.yaml")
        key = key.replace("-", "_")
        overrides = _merge(overrides, _dotted_to_nested(key, _parse_scalar(text)))
    return files, overrides


def _help_lines(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += _help_lines(tp, prefix + f.name + ".")  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "?"  # type: ignore[misc]
        )
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {default!r}")
    return lines


def config_help(cls: type) -> str:
    return "options (key=value, --key value, or --config file.yaml):\n" + "\n".join(_help_lines(cls))


def load_config(cls: type[T], argv: list[str] | None = None, defaults_file: str | os.PathLike[str] | None = None) -> T:
    """Resolve a config: dataclass defaults < ``defaults_file`` < ``--config`` files < overrides.

    Raises :class:`ConfigError` (a ``ValueError``) naming the bad key or file before any work starts.
    """
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(config_help(cls) + "\n")
        raise SystemExit(0)
    files, overrides = parse_args(argv)
    overrides = _aliased(cls, overrides)
    merged: dict[str, Any] = {}
    for f in ([defaults_file] if defaults_file else []) + files:
        merged = _merge(merged, read_yaml(f))
    merged = _merge(merged, overrides)
    return _build(cls, merged)


def _aliased(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Short aliases a script declares, e.g. ``ALIASES = {"resume": "train.resume"}`` so that the
    documented ``--resume auto`` works wherever the key lives in the schema."""
    for short, full in getattr(cls, "ALIASES", {}).items():
        if short in overrides and short not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            overrides = _merge(
                {k: v for k, v in overrides.items() if k != short}, _dotted_to_nested(full, overrides[short])
            )
    return overrides


def merge_overrides(base: Mapping[str, Any], overrides: Sequence[str],
                    root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``base`` with ``overrides`` applied in order, without a schema: ``--config`` files (read with the safe
    loader; relative paths against ``root``, default the working directory) first, then ``key=value`` /
    ``--key value`` pairs, nested mappings merged key by key. For configs whose dataclass is not importable;
    prefer :func:`resolve_config`.

    Raises :class:`ConfigError` for an unreadable file or an unparsable argument.
    """
    files, over = parse_args(list(overrides))
    merged = dict(base)
    for f in files:
        merged = _merge(merged, read_yaml(Path(root or ".") / f))
    return _merge(merged, over)


def resolve_config(cls: type[T], config_file: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                   values: Mapping[str, Any] | None = None, root: str | os.PathLike[str] | None = None) -> T:
    """Resolve and validate a config: ``cls`` defaults < ``config_file`` < ``overrides`` (``key=value``, as on
    the command line, ``cls.ALIASES`` included) < ``values`` (a nested mapping set by a program). Relative
    config files resolve against ``root`` (default: the working directory).

    The same resolution an entry script's :func:`load_config` makes from ``--config <file> <overrides>``.
    Raises :class:`ConfigError` naming an unknown key, a wrong type or an unreadable file.
    """
    files, over = parse_args(list(overrides))
    merged: dict[str, Any] = {}
    for f in ([config_file] if config_file else []) + files:
        merged = _merge(merged, read_yaml(Path(root or ".") / f))
    merged = _merge(merged, _aliased(cls, over))
    if values:
        merged = _merge(merged, dict(values))
    return _build(cls, merged)


def save_config(cfg: Any, out_dir: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML next to the outputs (atomically) and return its path."""
    from medpretrain.utils import atomic_write_text

    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


HASH_NEUTRAL: dict[str, dict[str, Any]] = {
    "EvalConfig": {"reuse_images": 64},
    "OptimConfig": {"class_balance": False},
    "FinetuneConfig": {"tasks": []},
    "BackboneConfig": {"memory_format": "auto"},
    "CompareConfig": {"workers": 1},
    "SegConfig": {"model": "unet", "full_resolution": False, "foreground_fraction": 0.0, "sw_size": 0, "tta": "none"},
    "DDPMConfig": {"ema_decay": 0.0, "ema_power": 0.75, "conditional": False, "class_dropout": 0.0,
                   "guidance_scale": 1.0},
    "VAEConfig": {"conditional": False},
    "DCGANConfig": {"conditional": False},
    "GenTrainConfig": {"class_balance": False},
    "TrainConfig": {"lr_scaling": "linear", "patch_size": 0, "patches_per_image": 1},
    "DataConfig": {"path_column": "image_path", "label_column": "label", "label_columns": None, "classes": None,
                   "patient_column": "patient", "split_column": None, "rgb_to_grey": "luma", "clahe": False,
                   "clahe_clip": 2.0, "clahe_grid": 8, "derive_fov": False, "fov_threshold": 0.1,
                   "cache": False, "cache_dir": None, "cache_workers": None, "cache_above_mb": 2048,
                   "stream": False, "synthetic": "", "synthetic_ratio": 0.0, "synthetic_per_class": None},
}
"""Options added after runs were cached, per config class: left out of :func:`hash_view` (so of every config,
stage and cell hash) while they hold the value listed here, the value under which they change nothing. Adding
such an option therefore does not invalidate every finished run; setting it to anything else does."""


EXECUTION_ONLY: dict[str, frozenset[str]] = {
    "CompareConfig": frozenset({"workers"}),
    "DataConfig": frozenset({"cache", "cache_dir", "cache_workers", "cache_above_mb", "stream"}),
}
"""Options that choose how a run executes, never what it computes (how many grid cells at once; whether images
are decoded into memory, into a disk cache or on access): left out of :func:`hash_view` whatever their value,
so switching them reuses finished runs. Each is also in :data:`HASH_NEUTRAL`, so hashes of runs made before
this table existed are unchanged. The tests check the claim for each (same results, same pixels)."""


def hash_view(cfg: Any) -> Any:
    """:func:`config_to_dict` of ``cfg`` without the :data:`HASH_NEUTRAL` options at their neutral values and
    without the :data:`EXECUTION_ONLY` options at any value: what config, stage and cell hashes are computed
    over."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        name = type(cfg).__name__
        neutral, skip = HASH_NEUTRAL.get(name, {}), EXECUTION_ONLY.get(name, frozenset())
        return {f.name: hash_view(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.name not in skip and not (f.name in neutral and getattr(cfg, f.name) == neutral[f.name])}
    if isinstance(cfg, (list, tuple)):
        return [hash_view(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: hash_view(v) for k, v in cfg.items()}
    return cfg


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (of its :func:`hash_view`), used to decide whether a stage can be reused."""
    import hashlib

    blob = json.dumps(hash_view(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
