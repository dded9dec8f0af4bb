"""``python -m medpretrain.launch``: ``accelerate launch`` (or ``torchrun``) whose failure is the child's.

``accelerate launch`` answers a child that exits non-zero with a second traceback of its own
(``subprocess.CalledProcessError`` from its ``simple_launcher``; with ``--quiet``, a bare exit status 1),
and ``torchrun`` (also behind ``accelerate launch --multi_gpu``) with a ``ChildFailedError`` traceback
and summary. This module runs the same launchers, from their own public entry functions, and:

* exits with the child's status (2 for an expected error, which the child printed as one line);
* for a child that failed otherwise, adds one line, ``error: <script> exited with status N`` (or
  ``was killed by signal SIGKILL``, where the child could print nothing), or torch's failure summary
  for several processes, without the launcher's own traceback;
* hides torch elastic's log notices ``failed (exitcode: 2) local_rank: ...`` (an expected error, already
  printed by the child) and ``Sending process N closing signal SIGTERM`` (the agent stopping the other
  ranks after a failure; the summary printed for any other failure still names every failed rank).

Usage, with exactly the arguments of the wrapped command::

    python -m medpretrain.launch --config_file configs/accelerate/single.yaml pretrain/simclr.py data.image_size=32
    python -m medpretrain.launch --torchrun --standalone --nproc_per_node 2 pretrain/simclr.py

Nothing of accelerate or torch is patched: the launchers are called as their own ``main`` calls them.
``MEDPRETRAIN_DEBUG=1`` passes through to the child (which then shows its traceback) and makes this
launcher re-raise as accelerate and torchrun do.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

from medpretrain.cli import EXIT_USAGE, debug_enabled

ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _HideExpectedExit(logging.Filter):
    """Drops torch elastic's per-process notices for children that exited with the expected-error status."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return f"(exitcode: {EXIT_USAGE})" not in message and "closing signal" not in message


def _status(code: int) -> int:
    """A shell's exit status for a child's return code (killed by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


def _describe(script: str, code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"error: {script} was killed by {name}"
    return f"error: {script} exited with status {code}"


def _child_failed(err: Any) -> int:
    """Exit status for torch elastic's ``ChildFailedError``: 2 when the first rank to fail exited with 2 and
    every other failed rank exited with 2 too or was stopped by the agent's SIGTERM after it."""
    first = err.get_first_failure()[1].exitcode
    others = {f.exitcode for f in err.failures.values()}
    if first == EXIT_USAGE and others <= {EXIT_USAGE, -signal.SIGTERM}:
        return EXIT_USAGE
    sys.stderr.write(str(err).strip("\n") + "\n")  # torch's summary: ranks, exit codes, error files
    return _status(first) if first else 1


def cpu_threads(args: Any, cuda: bool) -> int | None:
    """Threads per process for an ``accelerate launch`` on a machine without a GPU that names none
    (``--num_cpu_threads_per_process``, ``OMP_NUM_THREADS``): the CPUs this process may use, shared by the
    processes. ``None`` leaves accelerate's choice, which for a config without ``use_cpu`` (ours, so that the
    same file serves a GPU) is one thread: on a 2-core CPU that leaves a core idle in every pretraining stage.
    """
    if cuda or args.num_cpu_threads_per_process is not None or "OMP_NUM_THREADS" in os.environ:
        return None
    n = args.num_processes
    if n is None and args.config_file:
        import yaml

        with open(args.config_file) as fh:
            n = (yaml.safe_load(fh) or {}).get("num_processes")
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(n or 1)))


def _accelerate(argv: list[str]) -> int:
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    threads = cpu_threads(args, torch.cuda.is_available())
    if threads is not None:
        args.num_cpu_threads_per_process = threads
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # simple_launcher: one child, already reported itself
        if err.returncode != EXIT_USAGE:
            sys.stderr.write(_describe(str(args.training_script), err.returncode) + "\n")
        return _status(err.returncode)
    except ChildFailedError as err:  # multi_gpu_launcher: torch.distributed.run
        return _child_failed(err)
    except SystemExit as err:  # simple_launcher under --quiet: sys.exit(1) whatever the child's status
        return err.code if isinstance(err.code, int) else 1
    return 0


def _torchrun(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        return _child_failed(err)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``accelerate launch <argv>``, or ``torchrun <argv[1:]>`` when ``argv[0]`` is ``--torchrun``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if debug_enabled():  # the launchers' own behaviour, tracebacks included
        if argv[:1] == ["--torchrun"]:
            from torch.distributed.run import main as torchrun_main

            torchrun_main(argv[1:])
            return 0
        from accelerate.commands.launch import launch_command, launch_command_parser

        launch_command(launch_command_parser().parse_args(argv))
        return 0
    logging.getLogger(ELASTIC_LOGGER).addFilter(_HideExpectedExit())
    if argv[:1] == ["--torchrun"]:
        return _torchrun(argv[1:])
    return _accelerate(argv)


if __name__ == "__main__":
    sys.exit(main())
