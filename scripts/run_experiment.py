"""One command for a whole study: pretraining, generative models, fine-tune grids, audit, one report.

    python scripts/run_experiment.py configs/experiments/pneumonia.yaml
    python scripts/run_experiment.py configs/experiments/pneumonia.yaml dry_run=true          # plan only
    python scripts/run_experiment.py configs/experiments/drive_full.yaml \
        launch.config_file=configs/accelerate/multi_gpu.yaml                                 # N GPUs
    python scripts/run_experiment.py configs/experiments/tiny.yaml \
        launch.launcher=torchrun launch.args='[--nproc_per_node, 2]'                         # 2 CPU processes

An experiment file (``configs/experiments/*.yaml``, schema :data:`medpretrain.pipeline.experiment.ExperimentConfig`)
names the stages and the config file + overrides of each: one section per registered training stage
(``simclr``, ``moco``, ``vae``, ``dcgan``, ...), ``audit``, and the ``classification`` / ``segmentation``
fine-tune grids. Each stage is launched as its own process group with the experiment's launcher
(``accelerate launch --config_file configs/accelerate/<...>.yaml``, ``torchrun`` or plain ``python``).
``report.md`` says which init to use at each label budget and how sure that is, with the stage table (run,
resumed or reused, wall-clock); ``experiment.json`` is beside it.

Reuse and resume: a stage's folder is named by a hash of its script, its resolved config (validated against
the stage's config dataclass where it registers one) and the data files (paths, sizes, modification times).
A stage whose output exists under that hash is reused, one with checkpoints but no output is resumed, one that
died before its first checkpoint starts again; fine-tune cells are reused through their own config hash. So a
killed experiment continues where it stopped: run the same command again. The logic:
:mod:`medpretrain.pipeline`.

Run it with ``python`` (it is the orchestrator; each stage starts its own processes). Under a
multi-process launcher it refuses with that advice instead of running N orchestrators.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the stages inherit it (libgomp reads it at load)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from medpretrain.cli import UserError  # noqa: E402
from medpretrain.config import load_config  # noqa: E402
from medpretrain.pipeline.experiment import ExperimentConfig, run_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("run_experiment.py orchestrates and launches every stage itself: start it with python "
                        "(or `accelerate launch --num_processes 1`) and choose the processes with "
                        "launch.config_file=configs/accelerate/<...>.yaml or launch.launcher=torchrun")
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        argv = ["--config", argv[0], *argv[1:]]  # the experiment file as the first argument
    return run_experiment(load_config(ExperimentConfig, argv), sys.stdout)


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
