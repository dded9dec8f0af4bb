"""Run (or collect) a grid of fine-tuning runs and write one comparison report.

    python scripts/compare.py --config configs/compare.yaml
    python scripts/compare.py --config configs/compare.yaml collect_only=true     # report from what exists
    python scripts/compare.py inits='[scratch, selfsup, imagenet]' seeds='[0, 1, 2]' name=pneumonia

The grid is ``inits x regimes x label_fractions x seeds``; for a segmentation base config
(``task: segmentation``, e.g. ``configs/compare_drive.yaml``) it is ``inits x regimes x n_train_images x seeds``
with Dice as the headline metric. Each cell is one ``finetune/run.py`` run (``accelerate launch``, ``torchrun``,
or in this process with ``launcher=inprocess``) writing to
``<runs_dir>/finetune/<task>/<init>/<regime>/<fraction>/seed<k>``; a cell with complete results under the same
config hash is skipped, so an interrupted grid continues where it stopped. Unavailable arms (ImageNet weights
missing, no pretraining export) are reported as such and never replaced by random weights. Per (init, regime,
budget) an ensemble row scores the seeds' averaged test probabilities. The report goes to
``<runs_dir>/reports/<name>/``. Options: :class:`medpretrain.pipeline.grid.CompareConfig`; the logic:
:mod:`medpretrain.pipeline.grid`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState

from medpretrain.config import load_config
from medpretrain.pipeline.grid import CompareConfig, run_grid


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(CompareConfig, argv)
    return run_grid(cfg, sys.stdout if PartialState().is_main_process else None)[0]


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
