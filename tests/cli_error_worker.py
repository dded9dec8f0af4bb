"""Entry script for tests/test_cli_errors.py: a config error, a bug or a kill, without importing torch.

``python tests/cli_error_worker.py train.epochs=1`` exits 0; ``train.epoch=1`` is an unknown key (exit 2,
one line); ``fail=crash`` raises a RuntimeError (a bug: traceback, exit 1); ``fail=kill`` dies by SIGKILL.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from medpretrain.config import load_config


@dataclass
class Train:
    epochs: int = 1


@dataclass
class WorkerConfig:
    train: Train = field(default_factory=Train)
    fail: str = ""


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(WorkerConfig, argv)
    if cfg.fail == "crash":
        raise RuntimeError("a bug, not an expected error")
    if cfg.fail == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
