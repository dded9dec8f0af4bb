"""Errors for bad input: every message names the file and the reason, on one line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class DataError(ValueError):
    """A data file or dataset spec cannot be used. ``str(err)`` is ``"<file>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_pixel_limit(path: str | os.PathLike[str], count: int, limit: int, what: str = "image",
                      unit: str = "pixels") -> None:
    """Raise :class:`DataError` when ``count`` (from a file's header, before decoding) exceeds ``limit``.

    ``limit`` is ``data.max_pixels``; 0 means no limit.
    """
    if limit and count > limit:
        raise DataError(path, f"{what} has {count} {unit}, above the limit of {limit} (data.max_pixels)")


@dataclass
class SkipLog:
    """Collects files skipped under ``skip_bad: true`` so the run can report the count at the end."""

    skip_bad: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def handle(self, err: DataError) -> None:
        """Record ``err`` when skipping is on; otherwise raise it."""
        if not self.skip_bad:
            raise err
        self.skipped.append((err.path, err.reason))

    def summary(self) -> str:
        if not self.skipped:
            return "no files skipped"
        head = "; ".join(f"{p}: {r}" for p, r in self.skipped[:5])
        more = f" (+{len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return f"skipped {len(self.skipped)} bad file(s): {head}{more}"
