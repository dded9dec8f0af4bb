"""What a run writes as it goes: the metrics CSV, its plots, and the flat config for trackers.

Library code never prints: scripts report through ``accelerator.print``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medpretrain.config import config_to_dict
from medpretrain.utils import atomic_write_text


class CSVLogger:
    """Append-only CSV of metrics, one row per logged step, flushed on every write.

    The header is fixed by the first row (or ``fieldnames``); later rows may omit columns (left
    empty) but may not add new ones. On resume, :meth:`truncate_after` drops rows written after the
    checkpoint so the file has every step exactly once.
    """

    def __init__(self, path: str | os.PathLike[str], fieldnames: list[str] | None = None):
        self.path = Path(path)
        self.fieldnames = list(fieldnames) if fieldnames else None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self.fieldnames = header

    def log(self, row: Mapping[str, Any]) -> None:
        if self.fieldnames is None:
            self.fieldnames = list(row)
        extra = set(row) - set(self.fieldnames)
        if extra:
            raise ValueError(f"{self.path}: columns {sorted(extra)} are not in the header {self.fieldnames}")
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fieldnames)
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(v) for k, v in row.items()})

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate_after(self, step: int, key: str = "step") -> int:
        """Drop rows whose ``key`` is greater than ``step`` (atomically). Returns the rows dropped."""
        rows = self.rows()
        keep = [r for r in rows if r.get(key, "") == "" or int(float(r[key])) <= step]
        if len(keep) == len(rows) or self.fieldnames is None:
            return 0
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames)
        writer.writeheader()
        writer.writerows(keep)
        atomic_write_text(self.path, buf.getvalue())
        return len(rows) - len(keep)


def _fmt(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v



def plot_curves(
    csv_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    y_keys: tuple[str, ...] = ("loss",),
    x_key: str = "step",
    title: str | None = None,
) -> Path:
    """Plot columns of a metrics CSV against ``x_key`` into a PNG (matplotlib, Agg, written atomically).

    Each key gets its own panel; rows where a key is empty are skipped (e.g. kNN every N epochs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in y_keys if any(r.get(k) not in (None, "") for r in rows)]
    if not keys:
        raise ValueError(f"{csv_path}: none of the columns {list(y_keys)} has values to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        pts = [(float(r[x_key]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, linewidth=1)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png



def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.06, ...}`` with scalars only (TensorBoard's hparams refuse lists and None)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    walk("", config_to_dict(cfg))
    return out
