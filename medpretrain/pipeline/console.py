"""Where the pipeline's progress goes. The library never prints: an entry script passes its ``sys.stdout``
(or ``None`` for silence, e.g. on a non-main process) and every message goes there."""

from __future__ import annotations

from typing import TextIO

Console = TextIO | None


def say(console: Console, message: str) -> None:
    """One line on ``console`` (flushed, so it interleaves with the stages' own output)."""
    if console is not None:
        console.write(message + "\n")
        console.flush()


def relay(console: Console, chunk: bytes) -> None:
    """Raw output of a child process, as it comes."""
    if console is None:
        return
    buffer = getattr(console, "buffer", None)
    if buffer is not None:
        console.flush()
        buffer.write(chunk)
        buffer.flush()
    else:  # a text-only stream (io.StringIO)
        console.write(chunk.decode(errors="replace"))
        console.flush()
