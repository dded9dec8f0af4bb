"""Pretrain a backbone with any registered self-supervised method, with Accelerate.

    accelerate launch pretrain/train.py method=byol                        # configs/byol.yaml defaults
    accelerate launch pretrain/train.py --config configs/dino.yaml train.epochs=5
    accelerate launch pretrain/train.py method=vicreg train.resume=auto

The method is ``method=<name>`` (or ``--method <name>``); without it, the config file names it: by its
file name (``configs/<name>.yaml``, every method's registered default) or by its one method section
(``byol:``), which is how the experiment runner's ``--config <file>`` reaches the right method. Every other argument is
a config key of that method (``byol.momentum=0.996``, ``train.*``, ``data.*`` ...). Methods:
``medpretrain.methods.selfsup_methods()`` (SimCLR, MoCo v2, BYOL, VICReg, DINO, Barlow Twins, DenseCL); each is one
module under ``medpretrain/methods/`` and runs through the shared loop :func:`medpretrain.pretrain.main`.
Outputs in ``runs/pretrain/<method>/<run_name>/``, found later by ``finetune/run.py --init <method>``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see pretrain/simclr.py

from medpretrain import pretrain  # noqa: E402
from medpretrain.config import ConfigError, read_yaml  # noqa: E402
from medpretrain.methods import selfsup_methods  # noqa: E402


def split_method(argv: list[str]) -> tuple[str, list[str]]:
    """The method named in ``argv`` and the remaining arguments (see the module docstring)."""
    rest, name = [], ""
    args = iter(argv)
    for arg in args:
        if arg.startswith(("method=", "--method=")):
            name = arg.split("=", 1)[1]
        elif arg == "--method":
            name = next(args, "")
        else:
            rest.append(arg)
    files = [a for a in rest if a.endswith((".yaml", ".yml"))]
    for f in files if not name else []:
        groups = [m for m in selfsup_methods() if m in read_yaml(f)]  # e.g. a ``byol:`` section
        named = [Path(f).stem] if Path(f).stem in selfsup_methods() else groups
        if len(named) == 1:
            name = named[0]
    if not name:
        raise ConfigError(f"pretrain/train.py needs method=<name> (one of {', '.join(selfsup_methods())})")
    return name, rest


def main(argv: list[str] | None = None) -> None:
    name, rest = split_method(list(argv or []))
    pretrain.main(name, rest)


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
