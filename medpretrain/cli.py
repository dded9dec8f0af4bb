"""Command-line entry: expected errors as one line, ``error: <where>: <why>``, exit status 2.

Every entry script ends with::

    if __name__ == "__main__":
        from medpretrain.cli import run
        run(main)

``run`` calls ``main(sys.argv[1:])``. Expected failures (bad data, bad config, a missing init or
weights file, a run folder that exists) print one line on stderr and exit with status 2, like git or pip;
``MEDPRETRAIN_DEBUG=1`` re-raises them with the traceback. Anything else is a bug and keeps its traceback.
An ``int`` returned by ``main`` becomes the exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2
DEBUG_ENV = "MEDPRETRAIN_DEBUG"


class UserError(Exception):
    """An expected failure a person can fix (the message says how); printed as one line."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types printed as one line: input and configuration problems, not bugs."""
    from medpretrain.config import ConfigError
    from medpretrain.data.errors import DataError

    types: list[type[BaseException]] = [UserError, ConfigError, DataError, FileNotFoundError, FileExistsError]
    try:
        from medpretrain.checkpoint import CheckpointError

        types.append(CheckpointError)
    except ImportError:  # pragma: no cover - checkpoint imports torch; cli must still work without it
        pass
    return tuple(types)


def one_line(err: BaseException) -> str:
    """``error: <message>`` with newlines folded, so the whole failure is one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run ``main(argv)`` and exit: its int return value, 0, or 2 with one line for an expected error."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")
    try:
        code = main(args)
    except expected_errors() as err:
        if debug:
            raise
        sys.stdout.flush()
        print(one_line(err), file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
