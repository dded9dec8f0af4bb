"""Multi-task classification: one backbone, one head per task, trained jointly (``FinetuneConfig.tasks``).

A task (:class:`TaskSpec`) reads columns of a multi-label source's label vector, by name or 0-based index:
a manifest's ``data.label_columns`` (each column 0 / 1), or the findings of a multi-label set such as
ChestMNIST's 14. Its ``kind``:

* ``binary``: one column; a two-logit head (the MedMNIST convention of single-task binary runs);
* ``multiclass``: two or more one-hot columns (exactly one 1 per image); the target is the column that is 1;
* ``multilabel``: one or more columns, one sigmoid each.

The protocol (:class:`MultiTask`):

* training loss = ``sum_k weight_k * loss_k``, the weights as configured (not normalised); ``loss_k`` is the
  single-task loss of the task's kind (:func:`medpretrain.finetune.classification_loss`);
* every metric of the run (selection score, ``metrics``, ``ci``) is the weighted mean over tasks,
  ``sum_k w_k m_k / sum_k w_k``, of the task's metric (a task whose metric is undefined, e.g. AUC without
  positives, is left out of that mean with its weight); the checkpoint is selected on that mean of the
  per-task validation AUCs; each task's own metrics and CIs are in ``results.json`` ``tasks``;
* thresholds are chosen per task on validation (``eval.threshold``; multi-class: the arg-max);
* the run's predictions are also laid out as one multi-label column set (:meth:`MultiTask.column_view`: a
  binary task gives one column, the others one per label / class), so ``predictions.npz`` ``test_probs`` /
  ``test_labels`` are read like a multi-label run's (ensembles, paired tests); each task's own arrays are
  beside them (``task_<name>_probs`` / ``task_<name>_labels``).

Nothing here prints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from medpretrain.config import ConfigError
from medpretrain.metrics import METRICS, classification_metrics, operating_threshold, probabilities

NAME = re.compile(r"[A-Za-z0-9_-]+")
"""Task names: they become ``metrics.csv`` columns (``val_<name>_auc``), ``.npz`` keys and folder names."""


@dataclass
class TaskSpec:
    """One head of a multi-task classifier (an item of ``tasks``)."""

    name: str = ""
    """Letters, digits, ``_`` and ``-``; default: the one label's name (a task of several labels needs one)."""
    labels: list[str] = field(default_factory=list)
    """The columns of the source's label vector this task reads: names (``data.label_columns``, a set's
    findings) or 0-based indices."""
    kind: Literal["binary", "multiclass", "multilabel"] = "binary"
    """``binary``: one column; ``multiclass``: two or more one-hot columns; ``multilabel``: one or more."""
    weight: float = 1.0
    """The task's weight in the loss (as given) and in the selection / headline mean (normalised); > 0."""


def check_tasks(tasks: Sequence[TaskSpec], task: str) -> None:
    """Refuse bad ``tasks`` before any work: one line naming the key (``tasks[1].labels: ...``)."""
    if not tasks:
        return
    if task != "classification":
        raise ConfigError(f"config key 'tasks': multi-task heads are classification only, got task={task}")
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        key = f"tasks[{i}]"
        if not t.labels:
            raise ConfigError(f"config key '{key}.labels': a task reads at least one label column")
        if len(set(t.labels)) != len(t.labels):
            raise ConfigError(f"config key '{key}.labels': names a label twice: {t.labels}")
        if t.kind == "binary" and len(t.labels) != 1:
            raise ConfigError(f"config key '{key}.labels': a binary task reads exactly one label, got {t.labels}")
        if t.kind == "multiclass" and len(t.labels) < 2:
            raise ConfigError(f"config key '{key}.labels': a multiclass task reads two or more one-hot columns, "
                              f"got {t.labels}")
        if not (math.isfinite(t.weight) and t.weight > 0):
            raise ConfigError(f"config key '{key}.weight': must be a positive number, got {t.weight}")
        name = task_name(t)
        if not name:
            raise ConfigError(f"config key '{key}.name': a task of several labels needs a name")
        if not NAME.fullmatch(name):
            raise ConfigError(f"config key '{key}.name': {name!r} may hold only letters, digits, '_' and '-'")
        if name in seen:
            raise ConfigError(f"config key '{key}.name': {name!r} is also the name of tasks[{seen[name]}]")
        seen[name] = i


def task_name(t: TaskSpec) -> str:
    """``t.name``, else the one label's name with other characters than letters, digits, ``_``, ``-`` as
    ``_`` (``""`` for an unnamed task of several labels)."""
    if t.name:
        return t.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", t.labels[0]) if len(t.labels) == 1 else ""


def tasks_label(tasks: Sequence[TaskSpec]) -> str:
    """A short name of a task set for folders and reports: the names joined by ``+``, or ``<K>tasks-<hash>``
    when that is longer than 48 characters."""
    names = [task_name(t) for t in tasks]
    text = "+".join(names)
    if len(text) <= 48:
        return text
    import hashlib

    return f"{len(names)}tasks-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class ResolvedTask:
    """A :class:`TaskSpec` bound to the source: ``columns`` index the source's label vector."""

    name: str
    kind: str
    columns: tuple[int, ...]
    column_names: tuple[str, ...]
    weight: float

    @property
    def num_outputs(self) -> int:
        """Head outputs: 2 for binary (two logits), else one per column."""
        return 2 if self.kind == "binary" else len(self.columns)

    @property
    def view_names(self) -> list[str]:
        """Names of the task's columns in :meth:`MultiTask.column_view`: the task's name (binary), else
        ``<task>/<column>``."""
        return [self.name] if self.kind == "binary" else [f"{self.name}/{c}" for c in self.column_names]

    def target(self, labels: torch.Tensor | np.ndarray) -> Any:
        """The task's target from multi-hot labels ``[N, L]``: ``[N]`` int64 (binary: the column; multi-class:
        the column that is 1) or ``[N, K]`` float32 (multi-label). Tensors stay tensors."""
        cols = list(self.columns)
        if isinstance(labels, torch.Tensor):
            sub = labels[:, cols]
            if self.kind == "binary":
                return sub[:, 0].round().long()
            return sub.argmax(1) if self.kind == "multiclass" else sub.float()
        sub_np = np.asarray(labels)[:, cols]
        if self.kind == "binary":
            return np.rint(sub_np[:, 0]).astype(np.int64)
        return sub_np.argmax(1).astype(np.int64) if self.kind == "multiclass" else sub_np.astype(np.float32)


def _label_index(text: str, names: Sequence[str]) -> int | None:
    if text in names:
        return list(names).index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    return None


def resolve_tasks(specs: Sequence[TaskSpec], class_names: Sequence[str], source_task: str, dataset: str,
                  labels: Sequence[np.ndarray] = ()) -> list[ResolvedTask]:
    """Bind ``specs`` to a source whose label vector has ``class_names``; ``labels``: its label arrays
    (``[N, L]``, e.g. train / val / test), checked one-hot for multi-class tasks. Raises ``ConfigError``
    naming the key: a source that is not multi-label, an unknown label, a multi-class task on columns that
    are not one-hot."""
    if source_task != "multilabel":
        raise ConfigError(f"config key 'tasks': needs a multi-label source (a manifest with data.label_columns, or "
                          f"a multi-label set such as medmnist:chestmnist); {dataset} is {source_task}")
    out = []
    for i, t in enumerate(specs):
        cols = []
        for text in t.labels:
            j = _label_index(str(text), class_names)
            if j is None:
                raise ConfigError(f"config key 'tasks[{i}].labels': {text!r} is not a label of {dataset} (labels: "
                                  f"{', '.join(class_names)}; or a 0-based index)")
            cols.append(j)
        r = ResolvedTask(task_name(t), t.kind, tuple(cols), tuple(class_names[j] for j in cols), float(t.weight))
        if r.kind == "multiclass":
            for arr in labels:
                rows = np.asarray(arr)[:, cols]
                bad = np.flatnonzero(rows.sum(1) != 1)
                if len(bad):
                    raise ConfigError(f"config key 'tasks[{i}].kind': multiclass needs one-hot columns "
                                      f"{list(r.column_names)}, but {len(bad)} image(s) have "
                                      f"{int(rows[bad[0]].sum())} of them set (use multilabel)")
        out.append(r)
    return out


def _weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k v_k / sum_k w_k`` over the first axis of ``values`` (``[K]`` or ``[K, B]``), leaving out
    non-finite values with their weight (NaN where none is finite)."""
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float).reshape((-1,) + (1,) * (v.ndim - 1))
    ok = np.isfinite(v)
    num = (np.where(ok, v, 0.0) * w).sum(0)
    den = (ok * w).sum(0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


class MultiTask:
    """The tasks of a run and their protocol (see the module docstring): targets, loss, predictions,
    per-task metrics and thresholds, their weighted mean and its bootstrap CI."""

    def __init__(self, tasks: Sequence[ResolvedTask]):
        if not tasks:
            raise ValueError("MultiTask needs at least one task")
        self.tasks = list(tasks)
        self.weights = np.asarray([t.weight for t in self.tasks], dtype=float)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def outputs(self) -> dict[str, int]:
        """Head sizes by task (:class:`medpretrain.regimes.MultiTaskClassifier`)."""
        return {t.name: t.num_outputs for t in self.tasks}

    @property
    def view_names(self) -> list[str]:
        return [n for t in self.tasks for n in t.view_names]

    def val_columns(self) -> tuple[str, ...]:
        """The per-task validation AUCs logged every period (``val_<name>_auc`` columns)."""
        return tuple(f"{t.name}_auc" for t in self.tasks)

    def losses(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each task's loss on a batch (multi-hot ``labels [B, L]``): cross-entropy (binary: two logits;
        multi-class), BCE per label (multi-label)."""
        out = {}
        for t in self.tasks:
            y = t.target(labels)
            z = logits[t.name]
            out[t.name] = F.binary_cross_entropy_with_logits(z, y) if t.kind == "multilabel" else F.cross_entropy(z, y)
        return out

    def loss(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The training loss: ``sum_k weight_k * loss_k`` (:meth:`losses`)."""
        per_task = self.losses(logits, labels)
        total = self.tasks[0].weight * per_task[self.tasks[0].name]
        for t in self.tasks[1:]:
            total = total + t.weight * per_task[t.name]
        return total

    def arrays(self, probs: Mapping[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        """The prediction arrays of a split from each task's probabilities and the multi-hot ``labels [N, L]``:
        ``probs:<name>`` / ``labels:<name>`` (the task's own), ``probs`` / ``labels`` (:meth:`column_view`),
        ``index``."""
        out: dict[str, np.ndarray] = {"index": np.asarray(index)}
        for t in self.tasks:
            out[f"probs:{t.name}"] = np.asarray(probs[t.name])
            out[f"labels:{t.name}"] = t.target(labels)
        out["probs"], out["labels"] = self.column_view(out, labels)
        return out

    def view_labels(self, labels: np.ndarray) -> np.ndarray:
        """The 0/1 targets ``[N, M]`` of every task's columns (:attr:`view_names`) from multi-hot ``labels``."""
        return np.concatenate([np.asarray(labels)[:, list(t.columns)] for t in self.tasks], axis=1).astype(np.float32)

    def column_view(self, pred: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and 0/1 targets ``[N, M]`` over every task's columns (:attr:`view_names`): a binary task's
        positive-class probability, a multi-class task's class probabilities, a multi-label task's sigmoids."""
        ps = []
        for t in self.tasks:
            p = np.asarray(pred[f"probs:{t.name}"], dtype=np.float32)
            ps.append(p[:, None] if p.ndim == 1 else p)
        return np.concatenate(ps, axis=1), self.view_labels(labels)

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, loader: Any, accelerator: Any) -> dict[str, np.ndarray]:
        """:meth:`arrays` over a whole split, gathered across processes."""
        model.eval()
        probs: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        labels, index = [], []
        for batch in loader:
            out = model(batch["image"])
            ps = [probabilities(out[t.name], t.kind) for t in self.tasks]
            *ps, y, i = accelerator.gather_for_metrics((*ps, batch["label"], batch["index"]))
            for n, p in zip(self.names, ps, strict=True):
                probs[n].append(p.float().cpu())
            labels.append(y.cpu())
            index.append(i.cpu())
        return self.arrays({n: torch.cat(v).numpy() for n, v in probs.items()}, torch.cat(labels).numpy(),
                           torch.cat(index).numpy())

    def split_thresholds(self, threshold: Sequence[float | None] | None) -> dict[str, Any]:
        """Per task, its part of a column-view threshold list (binary: a number; multi-label: a list; multi-class:
        ``None``); ``None`` in: ``None`` for every task (the 0.5 default)."""
        out: dict[str, Any] = {}
        pos = 0
        for t in self.tasks:
            width = len(t.view_names)
            part = None if threshold is None else list(threshold[pos:pos + width])
            pos += width
            out[t.name] = None if part is None or t.kind == "multiclass" else part[0] if t.kind == "binary" else part
        return out

    def task_metrics(self, pred: Mapping[str, np.ndarray],
                     threshold: Sequence[float | None] | None = None) -> dict[str, dict[str, float]]:
        """Each task's six metrics (:func:`medpretrain.metrics.classification_metrics`) at its threshold."""
        thr = self.split_thresholds(threshold)
        return {t.name: classification_metrics(pred[f"probs:{t.name}"], pred[f"labels:{t.name}"], t.kind,
                                               threshold=thr[t.name]) for t in self.tasks}

    def mean(self, per_task: Mapping[str, Mapping[str, float]], keys: Sequence[str] = METRICS) -> dict[str, float]:
        """The weighted mean over tasks of each metric (non-finite values left out with their weight)."""
        return {k: float(_weighted_nanmean(np.asarray([per_task[n][k] for n in self.names]), self.weights))
                for k in keys}

    def evaluate(self, pred: Mapping[str, np.ndarray],
                 threshold: Sequence[float | None] | None = None) -> dict[str, float]:
        """:meth:`mean` of :meth:`task_metrics`, with each task's AUC as ``<name>_auc`` (logged per period)."""
        per_task = self.task_metrics(pred, threshold)
        return {**self.mean(per_task), **{f"{n}_auc": m["auc"] for n, m in per_task.items()}}

    def choose_thresholds(self, val: Mapping[str, np.ndarray], rule: str) -> tuple[list[float | None], dict[str, str]]:
        """Each task's threshold chosen on validation (:func:`medpretrain.metrics.operating_threshold`), laid out
        over the column view (``None`` for a multi-class task's columns), and each task's rule in words."""
        out: list[float | None] = []
        rules = {}
        for t in self.tasks:
            thr, text = operating_threshold(val[f"probs:{t.name}"], val[f"labels:{t.name}"], t.kind, rule)
            rules[t.name] = text
            if t.kind == "multiclass":
                out += [None] * len(t.columns)
            elif isinstance(thr, list):  # multi-label: one per label
                out += [float(v) for v in thr]
            elif thr is not None:  # binary
                out.append(float(thr))
        return out, rules

    def bootstrap_mean(self, pred: Mapping[str, np.ndarray], threshold: Sequence[float | None] | None, *,
                       n_boot: int, seed: int, alpha: float = 0.05) -> dict[str, dict[str, float]]:
        """Percentile bootstrap CI of the weighted mean of each metric over the test cases: the resamples are
        those :func:`medpretrain.metrics.bootstrap_ci` draws with ``seed`` (so each task's own CI, from that
        function, is over the same resamples); per resample, each task's metric, then :meth:`mean`."""
        from medpretrain.metrics import _binary_bootstrap_samples

        n = len(pred["index"])
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=gen)
        thr = self.split_thresholds(threshold)
        per_task = []
        for t in self.tasks:
            p = torch.as_tensor(pred[f"probs:{t.name}"]).float()
            y = torch.as_tensor(pred[f"labels:{t.name}"]).long()
            if t.kind == "binary":
                cut = 0.5 if thr[t.name] is None else float(thr[t.name])
                s = _binary_bootstrap_samples(p.double().numpy(), y.numpy(), idx.numpy(), (p >= cut).numpy())
                per_task.append({k: np.asarray(s[k], dtype=float) for k in METRICS})
                continue
            rows = [classification_metrics(p[b], y[b], t.kind, threshold=thr[t.name]) for b in idx]
            per_task.append({k: np.asarray([r[k] for r in rows], dtype=float) for k in METRICS})
        out = {}
        for k in METRICS:
            means = _weighted_nanmean(np.stack([s[k] for s in per_task]), self.weights)
            means = means[np.isfinite(means)]
            if len(means) == 0:
                out[k] = {"low": math.nan, "high": math.nan, "n": 0}
                continue
            lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[k] = {"low": float(lo), "high": float(hi), "n": int(len(means))}
        return out

    def describe(self) -> list[dict[str, Any]]:
        """The tasks as plain data (``model.safetensors`` meta, ``results.json``)."""
        return [{"name": t.name, "kind": t.kind, "labels": list(t.column_names), "columns": list(t.columns),
                 "weight": t.weight, "num_outputs": t.num_outputs} for t in self.tasks]


PROTOCOL = ("multi-task: metrics, ci and the selection score are the weighted mean over tasks (weights "
            "tasks[].weight / their sum; a task whose metric is undefined is left out of that mean) of each task's "
            "metric; loss = sum of weight * task loss; thresholds chosen per task on validation; each task's own "
            "metrics, CIs and threshold under 'tasks'")
"""``metric_protocol`` of a multi-task ``results.json``."""


__all__ = ["NAME", "PROTOCOL", "MultiTask", "ResolvedTask", "TaskSpec", "check_tasks", "resolve_tasks", "task_name",
           "tasks_label"]
