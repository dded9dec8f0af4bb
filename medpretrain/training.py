"""Deprecated: the former grab-bag module, split by concern. Import from the new homes instead:

* :mod:`medpretrain.runlog` — ``CSVLogger``, ``plot_curves``, ``flat_config``;
* :mod:`medpretrain.faults` — ``FiniteGuard``, ``NonFiniteLossError``, ``fault_hook``, ``inject_nan``;
* :mod:`medpretrain.resume` — ``Counter``, ``BufferState``, ``project_configuration``, ``save_checkpoint``,
  ``load_checkpoint``, ``list_checkpoints``, ``checkpoint_step``, ``resolve_resume``, ``prepare_resume``;
* :mod:`medpretrain.schedules` — ``warmup_cosine``;
* :mod:`medpretrain.data.loader` — ``image_loader``;
* :mod:`medpretrain.stage` — ``start_stage``, ``resolve_run_dir``, ``export_backbone``.

This shim re-exports them while the entry scripts move over; it goes away with the restructuring.
"""

from medpretrain.data.loader import image_loader
from medpretrain.faults import FiniteGuard, NonFiniteLossError, fault_hook, inject_nan
from medpretrain.resume import (
    COMPLETE_MARKER,
    TRAINING_STATE,
    BufferState,
    Counter,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    prepare_resume,
    project_configuration,
    resolve_resume,
    save_checkpoint,
    save_training_state,
)
from medpretrain.runlog import CSVLogger, flat_config, plot_curves
from medpretrain.schedules import warmup_cosine
from medpretrain.stage import export_backbone, resolve_run_dir

__all__ = [
    "COMPLETE_MARKER", "TRAINING_STATE", "BufferState", "CSVLogger", "Counter", "FiniteGuard", "NonFiniteLossError",
    "checkpoint_step", "export_backbone", "fault_hook", "flat_config", "image_loader", "inject_nan",
    "list_checkpoints", "load_checkpoint", "load_training_state", "prepare_resume", "plot_curves",
    "project_configuration", "resolve_resume", "resolve_run_dir", "save_checkpoint", "save_training_state",
    "warmup_cosine",
]
