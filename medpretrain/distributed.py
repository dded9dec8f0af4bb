"""Process-group facts every training script needs before it builds its ``Accelerator``.

``torchrun --nproc_per_node N`` (or a multi-node launcher) on a machine without CUDA: accelerate forms a gloo
process group (``MULTI_CPU``) only when told ``cpu=True``; without it every process silently trains alone
on its own copy of the data and they overwrite each other's outputs. :func:`cpu_group_needed` says when to
pass ``cpu=True``; :func:`check_world` refuses to go on if the group is not the one the launcher started.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from medpretrain.cli import UserError


def world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 when run with plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_group_needed() -> bool:
    """``Accelerator(cpu=...)``: True for several processes on a machine without CUDA."""
    return world_size() > 1 and not torch.cuda.is_available()


def check_world(accelerator: Any) -> None:
    """Raise ``RuntimeError`` when accelerate's group differs from what the launcher started."""
    if accelerator.num_processes != world_size():
        raise UserError(f"launched {world_size()} processes but accelerate formed a group of "
                           f"{accelerator.num_processes}; check the launcher and the accelerate config")
