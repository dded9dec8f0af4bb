"""The second contract between stages: a fine-tuning run's ``results.json`` and ``predictions.npz``.

:class:`RunResult` is the typed ``results.json`` of one ``finetune/run.py`` run, classification or
segmentation, whatever its ``status`` (``complete``, ``unavailable``: the init does not exist here,
``failed``: the run exited with an error, written by the grid runner). One writer
(:func:`write_results`) and one reader (:func:`read_results`); the file carries ``schema_version``
(:data:`SCHEMA_VERSION`). The headline metric belongs to the task (:func:`headline_metric`:
``auc`` for classification, ``dice`` for segmentation; :attr:`RunResult.headline`, :attr:`RunResult.score`).

:func:`save_predictions` / :func:`load_predictions` are the one writer / reader of a run's test
predictions (:class:`Predictions`), classification (probabilities ``[N, K]`` + labels) and segmentation
(probability maps as uint16, 0 outside the roi, + masks, rois, names), both as a ``.npz`` without pickles.
The layouts are in ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medpretrain.cli import UserError
from medpretrain.utils import atomic_path, atomic_write_text

SCHEMA_VERSION = 1
"""Version of the ``results.json`` layout. 0 (no ``schema_version`` key) is the same layout written before
the key existed: it loads unchanged."""

Status = Literal["complete", "unavailable", "failed"]
STATUSES: tuple[str, ...] = ("complete", "unavailable", "failed")

_HEADLINE = {"classification": "auc", "binary": "auc", "multiclass": "auc", "multilabel": "auc",
             "segmentation": "dice"}


class ResultsError(UserError, ValueError):
    """A ``results.json`` or ``predictions.npz`` that this code cannot read (the message says why)."""


def headline_metric(task: str) -> str:
    """The metric a run of ``task`` is selected and compared on: ``"dice"`` for ``segmentation``, ``"auc"`` for
    ``classification`` and its label tasks (``binary``, ``multiclass``, ``multilabel``). Raises ``ValueError``."""
    try:
        return _HEADLINE[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(_HEADLINE)}") from None


def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, mappings, sequences and paths (anything else becomes ``str``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------------
# results.json
# ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One fine-tuning run's ``results.json``.

    Every status has ``status``, ``task`` (``classification`` | ``segmentation``), ``init_label``, ``regime``,
    ``seed`` and the label budget (``label_fraction``; ``n_train_images`` for segmentation). ``unavailable``
    and ``failed`` add ``reason``; ``failed`` adds ``log_tail``. ``complete`` runs carry the rest: test and
    best-validation metrics (``metrics = {"test": {...}, "val_best": {...}}``), bootstrap ``ci`` per metric
    (``{"low", "high"}``), ``history`` (one row per epoch), ``timing``, ``data``, the config and its hashes.
    Classification only: ``roc``. Segmentation only: ``per_image``, ``metric_protocol``, ``optimizer_steps``.
    An evaluation of a finished run on another data set (no training) adds ``evaluated_from``.
    A field that does not apply is ``None`` and left out of the file (:meth:`to_dict`).
    """

    status: Status
    task: str
    init_label: str
    regime: str
    seed: int | None = None
    label_fraction: float | None = None
    n_train_images: int | None = None
    init: str | None = None
    label_task: str | None = None
    """``binary`` | ``multiclass`` | ``multilabel`` (classification data) or ``segmentation``."""
    reason: str | None = None
    log_tail: str | None = None
    init_info: dict[str, Any] | None = None
    init_warnings: list[str] | None = None
    regime_info: dict[str, Any] | None = None
    metrics: dict[str, dict[str, float]] | None = None
    per_image: list[dict[str, Any]] | None = None
    ci: dict[str, dict[str, float]] | None = None
    ci_method: str | None = None
    metric_protocol: str | None = None
    roc: dict[str, Any] | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    optimizer_steps: int | None = None
    threshold: float | list[float] | None = None
    """Decision threshold chosen on validation and applied to test (binary: one; multi-label: one per label;
    segmentation: the binarisation threshold; ``None`` for multi-class, which takes the arg-max)."""
    threshold_rule: str | None = None
    """How ``threshold`` was chosen, in words (``youden on validation``, ``fixed 0.5``, ``argmax``, ...)."""
    epochs_to_95: int | None = None
    """First epoch whose validation headline metric reaches 95% of the best (``None``: no finite epoch)."""
    steps_to_95: int | None = None
    """Optimiser steps run when that epoch (validation period) ended: convergence speed in steps."""
    seconds_to_95: float | None = None
    """Training wall-clock (sum of the periods' seconds, validation included) up to that epoch."""
    transfer: dict[str, Any] | None = None
    """Feature reuse (:func:`medpretrain.transfer.reuse_analysis`): per backbone stage, ``weight_change`` and
    ``cka`` before vs after fine-tuning; trained regimes with ``eval.reuse_images > 0`` only."""
    tasks: dict[str, dict[str, Any]] | None = None
    """Multi-task runs (``FinetuneConfig.tasks``, :mod:`medpretrain.multitask`) only: per task (in config order)
    ``kind``, ``labels``, ``weight``, ``metrics`` (``test``, ``val_best``), ``ci``, ``threshold`` and
    ``threshold_rule``. ``metrics`` / ``ci`` / ``threshold`` of the run itself are then the weighted mean over
    tasks and the per-column thresholds (``metric_protocol`` says so)."""
    history: list[dict[str, Any]] | None = None
    timing: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    config_hash: str | None = None
    """Hash of the requested config (``medpretrain.finetune.run_hash``): a grid skips a cell that matches it."""
    resolved_config_hash: str | None = None
    """Hash after the init checkpoint adjusted data options (mean, std, size, channels)."""
    code_version: str | None = None
    torch: str | None = None
    run_dir: str | None = None
    evaluated_from: str | None = None
    """Set for an evaluation without training (``scripts/evaluate.py``, :mod:`medpretrain.evaluate`): the run folder
    whose ``model.safetensors`` and threshold were scored here on ``data.dataset`` (e.g. trained on one retinal set,
    tested on another). Such a result is never a cell of a grid: reports list it under cross-dataset evaluation."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        headline_metric(self.task)  # an unknown task fails here

    @property
    def headline(self) -> str:
        """The task's headline metric name (:func:`headline_metric`)."""
        return headline_metric(self.task)

    @property
    def budget(self) -> float:
        """The label budget: annotated training images (segmentation) or the label fraction (1.0 when unset)."""
        if self.task == "segmentation" and self.n_train_images is not None:
            return float(self.n_train_images)
        return float(self.label_fraction) if self.label_fraction is not None else 1.0

    @property
    def score(self) -> float | None:
        """Test value of the headline metric (``None`` unless the run is complete)."""
        if self.status != "complete" or not self.metrics:
            return None
        return float(self.metrics["test"][self.headline])

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` mapping: ``schema_version`` first, then every field that applies (not ``None``;
        ``epochs_to_95`` is kept as ``null`` in complete runs). Callers that index by key can use it."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or (f.name == "epochs_to_95" and self.status == "complete"):
                out[f.name] = jsonable(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "results") -> RunResult:
        """Check and convert a ``results.json`` mapping. Raises :class:`ResultsError` naming ``source`` and why."""
        if not isinstance(d, dict):
            raise ResultsError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ResultsError(f"{source}: schema_version must be a whole number, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ResultsError(f"{source}: schema_version {version} was written by a newer medpretrain; this one "
                               f"reads versions 0 to {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ResultsError(f"{source}: not a fine-tuning results file of schema_version {version}: unknown "
                               f"keys {unknown}")
        missing = [k for k in ("status", "task", "init_label", "regime") if k not in d]
        if missing:
            raise ResultsError(f"{source}: not a fine-tuning results file of schema_version {version}: missing "
                               f"keys {missing}")
        if d["status"] == "complete":
            need = [k for k in ("metrics", "history", "data", "config", "config_hash") if d.get(k) is None]
            if need:
                raise ResultsError(f"{source}: a complete run needs {need}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ResultsError(f"{source}: {e}") from e


def write_results(run_dir: str | Path, result: RunResult) -> Path:
    """Write ``<run_dir>/results.json`` atomically (NaN stays NaN, as Python's json writes it). Returns the path."""
    path = Path(run_dir) / "results.json"
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=True))
    return path


def read_results(path: str | Path, *, missing_ok: bool = False) -> RunResult | None:
    """Read a ``results.json`` (:meth:`RunResult.from_dict`).

    A missing file raises ``FileNotFoundError``, or gives ``None`` with ``missing_ok``; unreadable JSON and
    files of another layout or a newer schema raise :class:`ResultsError` with the reason.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from e
    return RunResult.from_dict(d, source=str(path))


# ------------------------------------------------------------------------------------------------
# predictions.npz
# ------------------------------------------------------------------------------------------------

PROB_LEVELS = 65535
"""Saved segmentation probability maps are uint16: ``value / PROB_LEVELS`` (:func:`save_predictions`)."""


@dataclass
class Predictions:
    """A run's test predictions (:func:`load_predictions`).

    ``probs``: class probabilities ``[N, K]`` (classification; ``[N]`` or ``[N, K]`` as the run produced them)
    or foreground probability maps ``[N, H, W]`` float32 (segmentation). ``index``: dataset order ``[N]``.
    Classification: ``labels``. Segmentation: ``masks``, ``rois`` uint8 ``[N, H, W]`` and ``names`` ``[N]``.
    ``pred["probs"]`` works as ``pred.probs`` for callers that index by key.
    """

    probs: np.ndarray
    index: np.ndarray
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None
    rois: np.ndarray | None = None
    names: np.ndarray | None = None
    tasks: dict[str, dict[str, np.ndarray]] | None = None
    """Multi-task runs: each task's own ``{"probs", "labels"}`` (``probs`` / ``labels`` are then the column
    view of every task, :meth:`medpretrain.multitask.MultiTask.column_view`)."""

    @property
    def task(self) -> str:
        """``segmentation`` (masks present) or ``classification``."""
        return "segmentation" if self.masks is not None else "classification"

    def __getitem__(self, key: str) -> np.ndarray:
        value = getattr(self, key) if key in {f.name for f in dataclasses.fields(self)} else None
        if value is None:
            raise KeyError(key)
        return value

    def same_cases(self, other: Predictions) -> bool:
        """Same test cases in the same order with the same ground truth (the condition for averaging probs)."""
        keys = ("index", "names", "masks", "rois") if self.task == "segmentation" else ("index", "labels")
        return self.task == other.task and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in keys)


def quantize_probs(probs: np.ndarray, roi: np.ndarray | None = None) -> np.ndarray:
    """Probabilities in [0, 1] -> uint16 ``rint(p * 65535)``, 0 outside ``roi``.

    Rounding is done in float64, so ``q >= 32768`` exactly when ``p >= 0.5``: metrics at threshold 0.5
    (Dice, Jaccard, sensitivity, specificity) of the dequantised map equal those of the float map; the
    pixel AUC changes only through ties (steps of 1/65535). 16 bits rather than 8: an undertrained model's
    probabilities can all lie within a few 1/255 steps, and 8 bits then moved its AUC by 0.02 (measured).
    Raises ``ValueError`` for values outside [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("quantize_probs: probabilities must be finite and in [0, 1]")
    q = np.rint(p * PROB_LEVELS).astype(np.uint16)
    if roi is not None:
        q[np.asarray(roi) <= 0.5] = 0  # never scored; zeros compress well
    return q


def save_predictions(path: str | Path, probs: np.ndarray, masks: np.ndarray | None = None,
                     rois: np.ndarray | None = None, index: np.ndarray | None = None,
                     names: Sequence[str] | None = None, *, labels: np.ndarray | None = None,
                     tasks: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write one run's test predictions as a compressed ``.npz`` (no pickles), atomically.

    Classification (``labels`` given): ``test_probs`` (as given), ``test_labels``, ``test_index``; a multi-task
    run adds each task's ``(probs, labels)`` from ``tasks`` as ``task_<name>_probs`` / ``task_<name>_labels``.
    Segmentation (``masks`` and ``rois`` given): ``test_probs`` uint16 ``[N, H, W]`` (:func:`quantize_probs`, 0
    outside the roi), ``test_masks`` and ``test_rois`` uint8 {0, 1}, ``test_index`` int64 ``[N]`` (dataset
    order), ``test_names`` (unicode ``[N]``; the indices as text when ``names`` is None).
    Raises ``ValueError`` for mismatched shapes or a mix of both kinds.
    """
    probs = np.asarray(probs)
    if index is None:
        raise ValueError("save_predictions needs the dataset index of each prediction")
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) != len(probs):
        raise ValueError(f"{len(index)} indices for {len(probs)} predictions")
    if labels is not None:
        if masks is not None or rois is not None:
            raise ValueError("save_predictions: labels (classification) or masks + rois (segmentation), not both")
        labels = np.asarray(labels)
        if len(labels) != len(probs):
            raise ValueError(f"{len(labels)} labels for {len(probs)} predictions")
        arrays = {"test_probs": probs, "test_labels": labels, "test_index": index}
        for name, (task_probs, task_labels) in (tasks or {}).items():
            if len(task_probs) != len(probs) or len(task_labels) != len(probs):
                raise ValueError(f"task {name!r}: {len(task_probs)} predictions and {len(task_labels)} labels for "
                                 f"{len(probs)} cases")
            arrays[f"task_{name}_probs"], arrays[f"task_{name}_labels"] = np.asarray(task_probs), np.asarray(task_labels)
    else:
        if masks is None or rois is None:
            raise ValueError("save_predictions needs labels (classification) or masks and rois (segmentation)")
        masks, rois = np.asarray(masks), np.asarray(rois)
        if not probs.shape == masks.shape == rois.shape or probs.ndim != 3:
            raise ValueError(f"probs {probs.shape}, masks {masks.shape}, rois {rois.shape}: need three equal "
                             "[N, H, W]")
        text = [str(n) for n in names] if names is not None else [str(i) for i in index]
        arrays = {"test_probs": quantize_probs(probs, rois), "test_masks": (masks > 0.5).astype(np.uint8),
                  "test_rois": (rois > 0.5).astype(np.uint8), "test_index": index, "test_names": np.array(text)}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    return Path(path)


def load_predictions(path: str | Path) -> Predictions:
    """Read :func:`save_predictions` output (either kind); segmentation maps come back as float32 in [0, 1].

    Raises ``FileNotFoundError`` for a missing file and :class:`ResultsError` for a file of another layout.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if {"test_probs", "test_masks", "test_rois", "test_index", "test_names"} <= keys:
            return Predictions(probs=(z["test_probs"] / PROB_LEVELS).astype(np.float32), index=z["test_index"],
                               masks=z["test_masks"], rois=z["test_rois"], names=z["test_names"])
        if {"test_probs", "test_labels", "test_index"} <= keys:
            names = [k.removeprefix("task_").removesuffix("_probs") for k in z.files
                     if k.startswith("task_") and k.endswith("_probs")]
            tasks = {n: {"probs": z[f"task_{n}_probs"], "labels": z[f"task_{n}_labels"]} for n in names
                     if f"task_{n}_labels" in keys}
            return Predictions(probs=z["test_probs"], index=z["test_index"], labels=z["test_labels"],
                               tasks=tasks or None)
    raise ResultsError(f"{path}: not a predictions file (keys {sorted(keys)}; expected test_probs, test_index and "
                       "test_labels, or test_masks, test_rois and test_names)")


__all__ = [
    "PROB_LEVELS", "SCHEMA_VERSION", "STATUSES", "Predictions", "ResultsError", "RunResult", "headline_metric",
    "jsonable", "load_predictions", "quantize_probs", "read_results", "save_predictions", "write_results",
]
