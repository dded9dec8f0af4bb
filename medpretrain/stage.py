"""One start-up for every training entry script: :func:`start_stage` returns plain objects, no trainer class.

What each of pretraining, the generative models and fine-tuning needs before its loop, written once:

* the run folder (``out_dir/run_name``; ``train.resume=auto`` finds the newest unfinished run) and one
  resume policy: a folder that holds a finished run, or a run without ``resume``, is refused with
  :class:`RunFolderExists` (printed as one line by :mod:`medpretrain.cli`);
* the :class:`~accelerate.Accelerator` with the process group checked against the launcher
  (:mod:`medpretrain.distributed`), the seed set, accelerate's checkpoint bookkeeping;
* after the script has built and prepared its objects, :meth:`Stage.begin` loads the newest complete
  checkpoint into them (and into the script's own ``state``, saved without pickle), drops metric rows
  written after it, writes ``config.yaml`` and starts the trackers with the whole config;
* :meth:`Stage.log` (trackers + ``metrics.csv``), :meth:`Stage.checkpoint`, :meth:`Stage.check_finite`
  (the loss guard, all processes agree), :meth:`Stage.progress` (a tqdm bar on the local main process).

The training loop stays written out in each script (``../shared/STYLE.md``). Library code never prints:
messages are returned or go through ``accelerator.print`` in the scripts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpretrain.checkpoint import BackboneMeta, CheckpointError, save_backbone
from medpretrain.cli import UserError
from medpretrain.config import ConfigError, config_to_dict, save_config
from medpretrain.distributed import check_world, cpu_group_needed
from medpretrain.faults import FiniteGuard, NonFiniteLossError
from medpretrain.resume import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    prepare_resume,
    project_configuration,
    resolve_resume,
    save_checkpoint,
)
from medpretrain.runlog import CSVLogger, flat_config
from medpretrain.utils import PROJECT_ROOT, resolve_inside

DONE_FILE = "backbone.safetensors"


class RunFolderExists(UserError):
    """The run folder holds a finished run, or a run that was not asked to resume."""


def resolve_run_dir(out_dir: str, run_name: str, resume: str, done_file: str = DONE_FILE) -> tuple[Path, bool]:
    """The run folder and whether it already exists (a resume).

    ``out_dir`` relative paths resolve against the project root. With ``resume=auto`` and no
    ``run_name``, the newest run under ``out_dir`` that has a complete checkpoint but no ``done_file``
    yet (an interrupted run) is continued; if there is none a new run starts. ``run_name`` may not
    leave ``out_dir`` (``..`` or an absolute path is refused).
    """
    base = Path(out_dir)
    if not base.is_absolute():
        base = PROJECT_ROOT / base
    if resume.strip().lower() == "auto" and not run_name:
        candidates = [
            d for d in base.glob("*")
            if d.is_dir() and list_checkpoints(d / "checkpoints") and not (d / done_file).exists()
        ]
        if candidates:
            return max(candidates, key=lambda d: d.stat().st_mtime), True
    if resume and resume.strip().lower() not in ("auto", "none") and not run_name:
        # An explicit checkpoint path: the run folder is its grandparent (<run>/checkpoints/checkpoint_i).
        return Path(resume).expanduser().resolve().parent.parent, True
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    resolve_inside(base, name)
    run_dir = base / name
    return run_dir, run_dir.exists()


@dataclass
class Stage:
    """What :func:`start_stage` sets up; the script keeps its own loop and calls these few methods."""

    name: str
    cfg: Any
    accelerator: Any
    run_dir: Path
    metrics: CSVLogger
    resume_from: Path | None = None
    """The complete checkpoint :meth:`begin` loads (``None``: a fresh start)."""
    step_key: str = "step"
    """The x axis of ``metrics.csv`` and of the checkpoint markers (fine-tuning counts epochs)."""
    last_checkpoint: Path | None = None
    guard: FiniteGuard = field(init=False)

    def __post_init__(self) -> None:
        self.guard = FiniteGuard(self.accelerator.device)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def begin(self, state: Mapping[str, Any] | None = None, step_of: Any = None) -> int:
        """Call after ``accelerator.prepare``: load the resume checkpoint into the prepared objects and
        ``state`` (``{name: obj with state_dict()}``, saved without pickle), drop ``metrics.csv`` rows after
        its step, write ``config.yaml`` and start the trackers. Returns the step resumed from (0 if fresh).

        ``step_of`` (e.g. the script's step :class:`~medpretrain.resume.Counter`) is checked against the
        checkpoint's marker.
        """
        acc = self.accelerator
        prepare_resume(acc, self.ckpt_dir)
        step = 0
        if self.resume_from is not None:
            step = load_checkpoint(acc, self.resume_from, state)
            held = getattr(step_of, "value", step)
            if held != step:
                raise CheckpointError(self.resume_from, f"step counter {held} != marker {step}")
            self.last_checkpoint = self.resume_from
        if self.is_main:
            # resumed: rows after the checkpoint go; fresh start in an existing folder: every old row goes
            self.metrics.truncate_after(step if self.resume_from is not None else -1, key=self.step_key)
            save_config(self.cfg, self.run_dir)
        acc.init_trackers(self.name, config=flat_config(self.cfg))
        return step

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """One row to the trackers and ``metrics.csv`` (main process); ``step`` is the x axis of both
        (column :attr:`step_key`)."""
        self.accelerator.log({k: v for k, v in row.items() if k != self.step_key and v is not None}, step=step)
        if self.is_main:
            self.metrics.log({self.step_key: step, **row})

    def checkpoint(self, step: int, state: Mapping[str, Any] | None = None) -> Path:
        """Check the loss guard, then a complete checkpoint (never a checkpoint of garbage)."""
        self.check_finite()
        self.last_checkpoint = save_checkpoint(self.accelerator, step, state)
        return self.last_checkpoint

    def checkpoint_at_end(self, step: int, state: Mapping[str, Any] | None = None) -> Path:
        """A last checkpoint unless the newest already holds ``step``."""
        if self.last_checkpoint is not None and checkpoint_step(self.last_checkpoint) == step:
            return self.last_checkpoint
        return self.checkpoint(step, state)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` on every process if any process saw a NaN/inf loss."""
        acc = self.accelerator
        try:
            self.guard.check(self.last_checkpoint, reduce=lambda f: acc.gather(f).max())
        except NonFiniteLossError:
            acc.end_training()  # trackers flushed; medpretrain.cli prints the one line
            raise

    def progress(self, total: int, initial: int = 0, desc: str | None = None) -> Any:
        """A tqdm bar shown by the local main process only."""
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc or self.name, dynamic_ncols=True,
                    disable=not self.accelerator.is_local_main_process)

    def export_backbone(self, backbone: Any, ds: Any, method: str, image_size: int, steps: int, epochs: int,
                        extra: dict[str, Any], name: str = DONE_FILE) -> Path:
        """Write the contract checkpoint of ``backbone`` into the run folder (see :func:`export_backbone`)."""
        return export_backbone(self.run_dir / name, backbone, self.cfg, ds, method, image_size, steps, epochs,
                               extra)

    def finish(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def start_stage(
    name: str,
    cfg: Any,
    *,
    out_dir: str,
    run_name: str,
    resume: str,
    seed: int,
    fields: list[str] | None = None,
    step_key: str = "step",
    mixed_precision: str = "no",
    grad_accum: int = 1,
    log_with: str | None = "tensorboard",
    checkpoint_total_limit: int = 2,
    done_file: str = DONE_FILE,
    folder_key: str = "run_name",
    resume_key: str = "train.resume",
    **accelerator_kwargs: Any,
) -> Stage:
    """Run folder, accelerator (process group checked), seed, metrics file: everything before the data.

    One policy for every stage: an existing folder is refused (:class:`RunFolderExists`) unless ``resume``
    is set; a finished one (it holds ``done_file``) also unless it kept a complete checkpoint to continue
    from (a larger budget extends a finished run). With ``resume=auto`` and no complete checkpoint in an
    unfinished folder the run starts again from step 0 (nothing complete was there to keep). ``log_with="none"`` or ``None``:
    no tracker (``metrics.csv`` is always written). ``fields``: the CSV header (default: the first row's
    keys); ``step_key``: its x axis column. ``accelerator_kwargs`` go to ``Accelerator`` (e.g.
    ``dataloader_config``). ``folder_key`` / ``resume_key`` name the script's options in those messages.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    synthetic = getattr(getattr(cfg, "data", None), "synthetic", "")
    if synthetic and name != "finetune":
        raise ConfigError(f"data.synthetic={synthetic!r} is a fine-tuning option; the {name} stage would ignore it "
                          "(drop it from this stage's overrides)")
    run_dir, existing = resolve_run_dir(out_dir, run_name, resume, done_file)
    resume_from = resolve_resume(resume, run_dir / "checkpoints") if existing else None
    if (run_dir / done_file).exists() and resume_from is None:
        raise RunFolderExists(f"{run_dir}: already finished ({done_file} exists); pick another {folder_key}")
    if existing and not resume.strip():
        raise RunFolderExists(f"{run_dir}: exists; pass {resume_key}=auto to continue it, or another {folder_key}")
    accelerator = Accelerator(
        cpu=cpu_group_needed(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=None if log_with in (None, "none") else log_with,
        project_config=project_configuration(run_dir, checkpoint_total_limit),
        **accelerator_kwargs,
    )
    check_world(accelerator)
    set_seed(seed)
    return Stage(name, cfg, accelerator, run_dir, CSVLogger(run_dir / "metrics.csv", fields), resume_from, step_key)


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
