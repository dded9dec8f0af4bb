"""Training utilities shared by every stage: metrics CSV, loss guard, checkpoints, resume, plots.

Checkpoints use accelerate's own bookkeeping (``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)`` writes ``<project_dir>/checkpoints/checkpoint_<i>``) with one addition that makes them
safe against a kill mid-write: :func:`save_checkpoint` writes a ``COMPLETE`` marker (atomically, after
every process has finished writing) and :func:`resolve_resume` only ever returns folders that carry it.
A half-written folder is ignored and removed on resume. Because accelerate deletes the oldest folder
*before* writing the next one, ``total_limit`` must be at least 2 so that a complete checkpoint always
survives the write (:func:`project_configuration` enforces this).

Nothing in a checkpoint is ever unpickled. accelerate reads models (safetensors), optimizers and RNG
states with ``weights_only=True``, but objects registered with ``accelerator.register_for_checkpointing``
are read from ``custom_checkpoint_<i>.pkl`` with ``weights_only=False`` (accelerate 1.x,
``load_custom_state``), so a planted checkpoint could run code on resume. The scripts therefore register
nothing with accelerate: step counters, momentum encoders, memory banks, schedulers and the like go to
:func:`save_checkpoint` as ``state={name: object with state_dict()/load_state_dict()}`` and are written
to ``training_state.safetensors`` (tensors, plus a JSON tree of the other values in its header);
:func:`load_checkpoint` reads them back after ``accelerator.load_state``.

Library code never prints: scripts report through ``accelerator.print``.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medpretrain.checkpoint import BackboneMeta, load_state_dict, save_backbone, save_state_dict
from medpretrain.config import config_to_dict
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, resolve_inside

COMPLETE_MARKER = "COMPLETE"
TRAINING_STATE = "training_state.safetensors"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class CSVLogger:
    """Append-only CSV of metrics, one row per logged step, flushed on every write.

    The header is fixed by the first row (or ``fieldnames``); later rows may omit columns (left
    empty) but may not add new ones. On resume, :meth:`truncate_after` drops rows written after the
    checkpoint so the file has every step exactly once.
    """

    def __init__(self, path: str | os.PathLike[str], fieldnames: list[str] | None = None):
        self.path = Path(path)
        self.fieldnames = list(fieldnames) if fieldnames else None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self.fieldnames = header

    def log(self, row: Mapping[str, Any]) -> None:
        if self.fieldnames is None:
            self.fieldnames = list(row)
        extra = set(row) - set(self.fieldnames)
        if extra:
            raise ValueError(f"{self.path}: columns {sorted(extra)} are not in the header {self.fieldnames}")
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fieldnames)
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(v) for k, v in row.items()})

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate_after(self, step: int, key: str = "step") -> int:
        """Drop rows whose ``key`` is greater than ``step`` (atomically). Returns the rows dropped."""
        rows = self.rows()
        keep = [r for r in rows if r.get(key, "") == "" or int(float(r[key])) <= step]
        if len(keep) == len(rows) or self.fieldnames is None:
            return 0
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames)
        writer.writeheader()
        writer.writerows(keep)
        atomic_write_text(self.path, buf.getvalue())
        return len(rows) - len(keep)


def _fmt(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# --------------------------------------------------------------------------------------------
# Non-finite loss guard
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""

    def __init__(self, step: int, last_checkpoint: str | os.PathLike[str] | None):
        self.step = step
        self.last_checkpoint = str(last_checkpoint) if last_checkpoint else None
        where = (
            f"last good checkpoint: {self.last_checkpoint} (resume with resume=auto after fixing the cause)"
            if self.last_checkpoint
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"loss is not finite (NaN or inf) at step {step}; stopping. {where}. "
            "Common causes: learning rate too high, fp16 overflow (try mixed_precision=bf16), bad input data."
        )


class FiniteGuard:
    """Remembers the first step whose loss was not finite, without a host sync every step.

    ``update`` stays on the device; ``check`` (call it every few steps, before every checkpoint and
    at the end) synchronises once and raises :class:`NonFiniteLossError` naming that step.
    ``reduce`` makes all processes agree (e.g. ``lambda t: accelerator.gather(t).max()``) so that
    every rank stops at the same call instead of one rank leaving the others in a collective.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        step_t = torch.full_like(self.first_bad, step)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step_t, self.first_bad)

    def check(
        self,
        last_checkpoint: str | os.PathLike[str] | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        flag = self.first_bad
        if reduce is not None:
            flag = reduce(flag.reshape(1)).reshape(())
        step = int(flag)
        if step >= 0:
            raise NonFiniteLossError(step, last_checkpoint)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


class Counter:
    """A step counter that :func:`save_checkpoint` / :func:`load_checkpoint` carry (``state={"step": counter}``)."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value = int(state["value"])


class BufferState:
    """Checkpoint non-persistent buffers of a module (lightly's memory bank keeps its queue in
    ``persistent=False`` buffers, so ``state_dict()`` is empty and ``save_state`` would lose it)."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise ValueError(f"{type(module).__name__} has no buffer(s) {missing}")
        self.module = module
        self.names = list(names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.module, n).detach().cpu().clone() for n in self.names}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"buffer checkpoint has keys {sorted(state)}, expected {sorted(self.names)}")
        for n in self.names:
            getattr(self.module, n).copy_(state[n])


def project_configuration(run_dir: str | os.PathLike[str], total_limit: int = 2) -> Any:
    """accelerate's ``ProjectConfiguration`` with automatic checkpoint naming under ``run_dir``."""
    from accelerate.utils import ProjectConfiguration

    if total_limit < 2:
        raise ValueError(
            f"checkpoint total_limit must be >= 2 (got {total_limit}): accelerate deletes the oldest "
            "checkpoint before writing the next, so with 1 a kill mid-write would leave none"
        )
    return ProjectConfiguration(
        project_dir=str(run_dir),
        logging_dir=str(Path(run_dir) / "tb"),
        automatic_checkpoint_naming=True,
        total_limit=total_limit,
    )


def _index(path: Path) -> int:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(checkpoints_dir: str | os.PathLike[str], complete_only: bool = True) -> list[Path]:
    """``checkpoint_<i>`` folders sorted by ``i``; by default only those with the ``COMPLETE`` marker."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _index(p) >= 0]
    if complete_only:
        found = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=_index)


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """Optimizer step recorded in a complete checkpoint's marker."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        return int(json.loads(marker.read_text())["step"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a complete checkpoint (missing or unreadable {COMPLETE_MARKER}: {e})") from None


def resolve_resume(resume: str | None, checkpoints_dir: str | os.PathLike[str]) -> Path | None:
    """What ``resume=<value>`` means.

    * ``""``/``"none"``/``None``: start fresh (``None``);
    * ``"auto"``: the newest *complete* checkpoint under ``checkpoints_dir``, or ``None`` if there is
      none (so ``resume=auto`` is safe on a first run);
    * a path: that folder, which must be a complete checkpoint (``ValueError`` otherwise).
    """
    if resume is None or resume.strip().lower() in ("", "none", "false", "no"):
        return None
    if resume.strip().lower() == "auto":
        done = list_checkpoints(checkpoints_dir)
        return done[-1] if done else None
    path = Path(resume).expanduser()
    checkpoint_step(path)  # raises a clear error if it is not a complete checkpoint
    return path


def prepare_resume(accelerator: Any, checkpoints_dir: str | os.PathLike[str]) -> None:
    """Before ``load_state``/the first ``save_state`` of a resumed run: drop half-written folders
    (main process) and continue accelerate's folder numbering after the highest existing index."""
    d = Path(checkpoints_dir)
    if accelerator.is_main_process and d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and _index(p) >= 0 and not (p / COMPLETE_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    existing = list_checkpoints(d, complete_only=True)
    accelerator.project_configuration.iteration = (_index(existing[-1]) + 1) if existing else 0


def save_checkpoint(accelerator: Any, step: int, state: Mapping[str, Any] | None = None) -> Path:
    """``accelerator.save_state()`` (automatic naming, rotation by ``total_limit``), our own training state
    (:data:`TRAINING_STATE`, written by the main process from ``state``), then the marker.

    ``state`` maps names to objects with ``state_dict()`` / ``load_state_dict()`` (a :class:`Counter`, a
    momentum ``nn.Module``, a :class:`BufferState`, an LR scheduler, ...): pass the same mapping to
    :func:`load_checkpoint`. The marker is written by the main process after every process finished its
    part, atomically, so a folder without it is by construction incomplete. Returns the checkpoint folder.
    """
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("save_checkpoint needs ProjectConfiguration(automatic_checkpoint_naming=True)")
    out = Path(accelerator.project_dir) / "checkpoints" / f"checkpoint_{accelerator.save_iteration}"
    accelerator.save_state()
    if accelerator.is_main_process:
        save_training_state(out / TRAINING_STATE, state or {}, step)
    at = os.environ.get("MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT")  # test-only: killed before the marker
    if at and int(at) == step:
        os._exit(137)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(out / COMPLETE_MARKER, json.dumps({"step": int(step)}) + "\n")
    accelerator.wait_for_everyone()
    return out


def load_checkpoint(accelerator: Any, path: str | os.PathLike[str], state: Mapping[str, Any] | None = None) -> int:
    """Resume from a complete checkpoint: ``accelerator.load_state(path)`` (models from safetensors,
    optimizers and RNG states with ``weights_only=True``), then ``state`` from :data:`TRAINING_STATE`.

    Returns the step of the marker. Raises ``ValueError`` for a folder that is not a complete checkpoint,
    that holds accelerate's pickled ``custom_checkpoint_*.pkl`` (never read: unpickling runs code), or whose
    training state does not hold exactly the names of ``state``.
    """
    path = Path(path)
    step = checkpoint_step(path)
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise ValueError(f"{path}: holds pickled state {pickled} (an older checkpoint format); it is never "
                         "unpickled because that can run arbitrary code. Start a new run (another run_name).")
    accelerator.load_state(str(path))
    load_training_state(path / TRAINING_STATE, state or {})
    return step


_TENSOR, _COUNTER = "__tensor__", "__counter__"


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON tree of ``value``; tensors go to ``tensors`` under ``where`` and leave a reference behind."""
    if isinstance(value, torch.Tensor):
        if where in tensors:
            raise TypeError(f"training state {where}: two tensors would share this name")
        tensors[where] = value
        return {_TENSOR: where}
    if isinstance(value, collections.Counter):  # MultiStepLR's milestones: int keys that JSON would stringify
        return {_COUNTER: [[k, _encode(v, f"{where}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or k in (_TENSOR, _COUNTER)]
        if bad:
            raise TypeError(f"training state {where}: keys {bad!r} are not plain strings")
        return {k: _encode(v, f"{where}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"training state {where}: a {type(value).__name__} cannot be saved without pickle")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            if value[_TENSOR] not in tensors:
                raise ValueError(f"{source}: tensor {value[_TENSOR]!r} is missing")
            return tensors[value[_TENSOR]]
        if set(value) == {_COUNTER}:
            return collections.Counter({k: _decode(v, tensors, source) for k, v in value[_COUNTER]})
        return {k: _decode(v, tensors, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    return value


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any], step: int) -> Path:
    """Write ``{name: obj.state_dict()}`` without pickle: tensors as safetensors, the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {name: _encode(obj.state_dict(), name, tensors) for name, obj in state.items()}
    return save_state_dict(path, tensors, {"training_state": tree, "step": int(step)})


def load_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Read :func:`save_training_state`'s file into the objects of ``state`` (exactly the same names)."""
    path = Path(path)
    tensors, meta = load_state_dict(path)
    tree = meta.get("training_state")
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: no training state in the metadata")
    if set(tree) != set(state):
        raise ValueError(f"{path}: training state holds {sorted(tree)}, this run expects {sorted(state)} "
                         f"(missing {sorted(set(state) - set(tree))}, unexpected {sorted(set(tree) - set(state))})")
    for name, obj in state.items():
        obj.load_state_dict(_decode(tree[name], tensors, path))


# --------------------------------------------------------------------------------------------
# Schedules and plots
# --------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``final`` at ``total``."""
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))


def plot_curves(
    csv_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    y_keys: tuple[str, ...] = ("loss",),
    x_key: str = "step",
    title: str | None = None,
) -> Path:
    """Plot columns of a metrics CSV against ``x_key`` into a PNG (matplotlib, Agg, written atomically).

    Each key gets its own panel; rows where a key is empty are skipped (e.g. kNN every N epochs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in y_keys if any(r.get(k) not in (None, "") for r in rows)]
    if not keys:
        raise ValueError(f"{csv_path}: none of the columns {list(y_keys)} has values to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        pts = [(float(r[x_key]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, linewidth=1)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


def resolve_run_dir(out_dir: str, run_name: str, resume: str) -> tuple[Path, bool]:
    """The run folder and whether it already exists (a resume).

    ``out_dir`` relative paths resolve against the project root. With ``resume=auto`` and no
    ``run_name``, the newest run under ``out_dir`` that has a complete checkpoint but no exported
    backbone yet (an interrupted run) is continued; if there is none a new run starts.
    """
    base = Path(out_dir)
    if not base.is_absolute():
        base = PROJECT_ROOT / base
    if resume.strip().lower() == "auto" and not run_name:
        candidates = [
            d for d in base.glob("*")
            if d.is_dir() and list_checkpoints(d / "checkpoints") and not (d / "backbone.safetensors").exists()
        ]
        if candidates:
            return max(candidates, key=lambda d: d.stat().st_mtime), True
    if resume and resume.strip().lower() not in ("auto", "none") and not run_name:
        # An explicit checkpoint path: the run folder is its grandparent (<run>/checkpoints/checkpoint_i).
        return Path(resume).expanduser().resolve().parent.parent, True
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    resolve_inside(base, name)  # refuses a run_name with '..' or an absolute path: it cannot leave out_dir
    run_dir = base / name
    return run_dir, run_dir.exists()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def image_loader(
    ds: Any, batch_size: int, cache_on_device: bool, device: torch.device, num_workers: int = 0
) -> tuple[DataLoader, torch.Generator, Callable[[Any], torch.Tensor]]:
    """A shuffling, ``drop_last`` loader (equal batches on every process, as the gathered NT-Xent
    needs), its sampler generator (re-seed per epoch for resumable order) and a function from a
    batch to images ``[B, C, H, W]`` on ``device``.

    With ``cache_on_device`` the loader yields indices into the split, stacked once on ``device``.
    """
    if len(ds) < batch_size:
        raise ValueError(f"pretraining split has {len(ds)} images, fewer than batch_size={batch_size}")
    gen = torch.Generator()
    if cache_on_device:
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        loader = DataLoader(_Indices(len(ds)), batch_size=batch_size, sampler=RandomSampler(range(len(ds)), generator=gen),
                            drop_last=True)
        return loader, gen, lambda idx: images[idx.to(device)]
    loader = DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds, generator=gen), drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    return loader, gen, lambda batch: batch["image"].to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Export and logging helpers
# --------------------------------------------------------------------------------------------


def export_backbone(
    path: Path, backbone: Any, cfg: Any, ds: Any, method: str, image_size: int,
    steps: int, epochs: int, extra: dict[str, Any],
) -> Path:
    """Write the contract checkpoint (``medpretrain.checkpoint.save_backbone``) with full metadata."""
    meta = BackboneMeta(
        arch=backbone.arch, in_channels=backbone.in_channels, stem=backbone.stem, image_size=image_size,
        mean=cfg.data.mean, std=cfg.data.std, method=method, dataset=ds.spec, dataset_hash=ds.fingerprint,
        epochs=epochs, steps=steps, config=config_to_dict(cfg), extra=extra,
    )
    return save_backbone(path, backbone, meta)


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.06, ...}`` with scalars only (TensorBoard's hparams refuse lists and None)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    walk("", config_to_dict(cfg))
    return out


def fault_hook(step: int) -> None:
    """Test-only fault injection: ``MEDPRETRAIN_FAULT_EXIT_AT_STEP=k`` hard-exits (like SIGKILL, no
    cleanup) right after optimizer step ``k``; with ``MEDPRETRAIN_FAULT_RANK=r`` only process ``r`` does."""
    at = os.environ.get("MEDPRETRAIN_FAULT_EXIT_AT_STEP")
    rank = os.environ.get("MEDPRETRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if at and int(at) == step:
        os._exit(137)


def inject_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Test-only: ``MEDPRETRAIN_FAULT_NAN_AT_STEP=k`` turns the loss of step ``k`` into NaN."""
    at = os.environ.get("MEDPRETRAIN_FAULT_NAN_AT_STEP")
    if at and int(at) == step:
        return loss * float("nan")
    return loss
