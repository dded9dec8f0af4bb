"""Command-line entry: expected errors as one line, ``error: <where>: <why>``, exit status 2.

Every entry script ends with::

    if __name__ == "__main__":
        from medpretrain.cli import run
        run(main)

``run`` calls ``main(sys.argv[1:])``. Expected failures (bad data, bad config, a missing init or
weights file, an unavailable arm, a run folder that exists) print one line on stderr and exit with
status 2, like git or pip; ``MEDPRETRAIN_DEBUG=1`` re-raises them with the traceback. Anything else is
a bug and keeps its traceback. An ``int`` returned by ``main`` becomes the exit status.

Several processes (``torchrun``, ``accelerate launch --num_processes N``): every rank hits the same
config or data error, so every rank exits with status 2, but one line is printed per distinct message
on a machine: the first rank to create a marker file for that message in torch elastic's per-run
folder prints it (ranks that fail for another reason print theirs). Each rank also writes the line to
its ``TORCHELASTIC_ERROR_FILE``, so torchrun's failure summary shows it in place of "To enable
traceback see ...". :mod:`medpretrain.launch` runs accelerate's launcher without its extra traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
DEBUG_ENV = "MEDPRETRAIN_DEBUG"
ELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"


class UserError(Exception):
    """An expected failure a person can fix (the message says how); printed as one line."""


def debug_enabled() -> bool:
    """``MEDPRETRAIN_DEBUG`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types printed as one line: input and configuration problems, not bugs."""
    from medpretrain.config import ConfigError
    from medpretrain.data.errors import DataError

    types: list[type[BaseException]] = [UserError, ConfigError, DataError, FileNotFoundError, FileExistsError]
    # Modules that import torch count only once loaded: an error cannot be of a type never imported.
    # NonFiniteLossError: the run stopped on a NaN/inf loss; the line names the step, the last good checkpoint
    # and the usual causes.
    for module, name in (("medpretrain.checkpoint", "CheckpointError"), ("medpretrain.init", "WeightsHashMismatch"),
                         ("medpretrain.faults", "NonFiniteLossError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def one_line(err: BaseException) -> str:
    """``error: <message>`` with newlines folded, so the whole failure is one line.

    An ``OSError`` raised with a file name (``open("x")``) reads ``error: x: No such file or directory``.
    """
    if isinstance(err, OSError) and err.filename is not None and err.strerror and len(err.args) <= 2:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
    text = " ".join(text.split()) or type(err).__name__
    return f"error: {text}"


def _first_on_this_machine(line: str) -> bool:
    """False when another rank of the same torch elastic run already printed ``line``.

    Every rank's ``TORCHELASTIC_ERROR_FILE`` lies in ``<run folder>/attempt_<k>/<rank>/``; the attempt
    folder is shared by the ranks of one machine, so an exclusive-create marker there elects one printer
    per message. Outside torch elastic (one process, plain ``python``) every line is printed.
    """
    error_file = os.environ.get(ELASTIC_ERROR_FILE)
    if not error_file:
        return True
    marker = Path(error_file).parent.parent / f"medpretrain-error-{hashlib.sha256(line.encode()).hexdigest()[:16]}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or read-only: print rather than lose the line
        return True
    return True


def _write_elastic_error_file(line: str) -> None:
    """The line as torch elastic's error file, which torchrun's failure summary shows as the traceback.

    The layout is the one ``torch.distributed.elastic``'s ``@record`` writes (``message.extraInfo.py_callstack``),
    with the one line in place of the traceback.
    """
    error_file = os.environ.get(ELASTIC_ERROR_FILE)
    if not error_file:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        Path(error_file).write_text(json.dumps(data))
    except OSError:
        pass


def report(err: BaseException) -> None:
    """Print ``err`` as one line on stderr (once per machine under torch elastic); see the module docstring."""
    line = one_line(err)
    _write_elastic_error_file(line)
    sys.stdout.flush()
    if _first_on_this_machine(line):
        sys.stderr.write(line + "\n")  # the command line's own output: the one place that writes the error
        sys.stderr.flush()


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run ``main(argv)`` and exit: its int return value, 0, or 2 with one line for an expected error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except expected_errors() as err:
        if debug_enabled():
            raise
        report(err)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
