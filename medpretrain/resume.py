"""Checkpoints and resume for every training stage, on accelerate's own bookkeeping.

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
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medpretrain.checkpoint import load_state_dict, save_state_dict
from medpretrain.utils import atomic_write_text

COMPLETE_MARKER = "COMPLETE"
TRAINING_STATE = "training_state.safetensors"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


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

