"""Upsampling geometry shared by the VAE decoder and the DCGAN generator: any square size from 8 px up.

The upsampling stacks overshoot to ``start * 2**n_up >= image_size`` (``start`` in 4..8) and centre-crop
(:func:`upsampling_plan`, :func:`center_crop`), so 28, 33, 64 and 128 px all work.
"""

from __future__ import annotations

import math

from torch import Tensor

from medpretrain.config import ConfigError

MAX_CHANNELS = 512


def upsampling_plan(image_size: int) -> tuple[int, int]:
    """``(start, n_up)`` with ``start * 2**n_up >= image_size`` and ``start`` in 4..8.

    28 -> (7, 2), 64 -> (4, 4), 128 -> (4, 5), 33 -> (5, 3) (40 px, centre-cropped to 33).
    Raises ``ValueError`` below 8 px.
    """
    if image_size < 8:
        raise ConfigError(f"image_size must be at least 8, got {image_size}")
    n_up = max(1, int(math.floor(math.log2(image_size / 4))))
    start = math.ceil(image_size / 2**n_up)
    return start, n_up


def center_crop(x: Tensor, size: int) -> Tensor:
    """Centre-crop the last two dimensions of ``x`` to ``size`` (no-op when already that size)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def level_channels(base: int, level: int) -> int:
    return min(MAX_CHANNELS, base * 2**level)


def check_positive(**values: int) -> None:
    """``ValueError`` naming the arguments unless every one of ``values`` is at least 1."""
    if any(v < 1 for v in values.values()):
        raise ValueError(f"{', '.join(values)} must be positive, got {', '.join(str(v) for v in values.values())}")
