"""MoCo v2 pretraining of a medpretrain backbone on in-domain scans, with Accelerate.

    accelerate launch pretrain/moco.py                                     # configs/moco.yaml defaults
    accelerate launch pretrain/moco.py train.epochs=5 data.image_size=64 moco.queue_size=4096
    accelerate launch pretrain/moco.py train.resume=auto                   # continue an interrupted run

The method (query encoder, momentum key encoder under a cosine schedule, lightly's memory bank as the
queue, shuffling BN across processes and split-batch BN on one process, ``moco.split_bn``) is
:mod:`medpretrain.methods.moco`; the loop every method shares is :func:`medpretrain.pretrain.main`.
Same as ``pretrain/train.py method=moco``.

Outputs in ``runs/pretrain/moco/<run_name>/``: ``backbone.safetensors`` (found by ``finetune/run.py --init moco``
or ``--init selfsup``), ``config.yaml``, ``metrics.csv``, ``loss.png``, ``tb/``, ``checkpoints/`` (the momentum
encoder and the queue included, without pickle).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see pretrain/simclr.py

from medpretrain import pretrain  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    pretrain.main("moco", argv)


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
