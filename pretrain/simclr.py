"""SimCLR pretraining of a medpretrain backbone on in-domain scans, with Accelerate.

    accelerate launch pretrain/simclr.py                                   # configs/simclr.yaml defaults
    accelerate launch pretrain/simclr.py train.epochs=5 data.image_size=64 train.mixed_precision=bf16
    accelerate launch pretrain/simclr.py train.resume=auto                 # continue an interrupted run

The method (backbone -> ``SimCLRProjectionHead`` -> ``NTXentLoss`` with negatives gathered across processes
with gradients) is :mod:`medpretrain.methods.simclr`; the loop every method shares is
:func:`medpretrain.pretrain.main`. Same as ``pretrain/train.py method=simclr``.

Outputs in ``runs/pretrain/simclr/<run_name>/``: ``backbone.safetensors`` (the contract checkpoint that
``finetune/run.py --init simclr`` or ``--init selfsup`` finds: the newest export by ``meta.created``, see
``medpretrain.init.find_latest_export``), ``config.yaml``, ``metrics.csv``, ``loss.png``, ``tb/``,
``checkpoints/``. ``train.resume=auto`` continues the newest run under ``out_dir`` that has a complete
checkpoint but no export yet (or the run named by ``run_name``).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads wait
# on descheduled peers and small batched ops slow down many-fold (measured: the cbr_tiny SimCLR step went
# from 6 to 250 images/s on a loaded 2-core machine). Must be set before torch loads libgomp; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from medpretrain import pretrain  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    pretrain.main("simclr", argv)


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
