"""Writing image tensors to files: 8-bit pixels and the one PNG grid writer of the project.

Generative samples are in [-1, 1] (the default ``value_range``); the audit's images are in [0, 1]
(``value_range=(0, 1)``). Both go through :func:`save_grid`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

MINUS_ONE_ONE = (-1.0, 1.0)


def to_uint8(images: Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE) -> Tensor:
    """``[N, C, H, W]`` in ``value_range`` -> uint8 ``[N, C, H, W]`` in 0..255 (clamped, round to nearest).

    Raises ``ValueError`` for an empty range.
    """
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    # (x - lo) * (255 / (hi - lo)): for [-1, 1] this is (x + 1) * 127.5, for [0, 1] x * 255, both exact.
    return ((images.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | os.PathLike[str], nrow: int | None = None,
              value_range: tuple[float, float] = MINUS_ONE_ONE) -> Path:
    """Write ``[N, C, H, W]`` images (grey or RGB) in ``value_range`` as one PNG grid, atomically.

    ``nrow`` images per row (default: a square-ish grid), 2 px white padding. Returns the path; raises
    ``ValueError`` when ``images`` is empty.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    from medpretrain.utils import atomic_path

    n = images.shape[0]
    if n == 0:
        raise ValueError(f"save_grid got no images for {path}")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    grid = make_grid(to_uint8(images.cpu(), value_range), nrow=nrow, padding=2, pad_value=255)
    array = grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
