"""Image helpers used by the readers, and MONAI-style dictionary transforms for segmentation.

Readers use :func:`to_channels` and :func:`resize` (bilinear with antialiasing for images, nearest
for masks and regions of interest). The dictionary transforms take and return a sample dict
(``{"image": [C,H,W], "mask": [1,H,W], "roi": [1,H,W], ...}``) and draw their randomness once per
sample, so image, mask and roi move together.

Randomness: with ``seed=None`` the transforms use torch's global generator, which a ``DataLoader``
seeds differently in every worker. With an integer ``seed`` they use their own ``torch.Generator``
(reproducible; note that every DataLoader worker then gets a copy of the same generator state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ITU-R BT.601 luma weights, the conversion PIL's convert("L") uses.
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Sample = dict[str, Any]


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``[C, H, W]`` (C in 1, 3) to ``channels`` (1 or 3).

    RGB to grey uses ITU-R 601 luma; an RGB image whose three channels are equal is converted
    exactly (its first channel). Grey to RGB repeats the channel.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    c = image.shape[0]
    if c == channels:
        return image
    if c == 1:
        return np.repeat(image, 3, axis=0)
    if c != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {image.shape}")
    if np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2]):
        return image[:1].copy()
    grey = np.tensordot(LUMA_601, image.astype(np.float32), axes=(0, 0))
    return grey[None].astype(image.dtype, copy=False)


def _resize_plane(plane: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode F
    out = im.resize((hw[1], hw[0]), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def resize(images: np.ndarray, size: int | tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize ``[C, H, W]`` or ``[N, C, H, W]`` float arrays to ``size`` (square int or ``(H, W)``).

    Images: bilinear with antialiasing (PIL's filter support grows when shrinking, so 224 -> 28 does
    not alias; same algorithm as torch's ``antialias=True``). Masks / rois (``nearest=True``): nearest
    neighbour, so values stay in {0, 1}. Returns float32 clipped to [0, 1]. PIL is used rather than
    torch because it runs single-threaded and fast on a busy CPU.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == hw:
        return images.astype(np.float32, copy=False)
    lead = images.shape[:-2]
    planes = images.reshape(-1, *images.shape[-2:])
    out = np.empty((len(planes), *hw), dtype=np.float32)
    for i, plane in enumerate(planes):
        out[i] = _resize_plane(plane, hw, nearest)
    np.clip(out, 0.0, 1.0, out=out)
    return out.reshape(*lead, *hw)


def _rng_int(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high, (1,), generator=generator).item()) if high > 1 else 0


class PairedRandomCrop:
    """Crop the same random ``size`` window from every key present (image, mask, roi).

    Inputs smaller than ``size`` are zero-padded first (padding is outside the roi).
    Args: size: int or (H, W); keys: sample keys to crop; seed: see the module docstring; foreground: the
    probability that the window is centred on a foreground pixel (``mask > 0`` and, when present,
    ``roi > 0``) drawn uniformly, shifted to stay inside the image (vessel-weighted sampling: thin structures
    cover ~12 % of a fundus image); otherwise, and for a sample without foreground, the window is uniform.
    With ``foreground=0`` the draws are exactly those of a uniform crop.
    """

    def __init__(self, size: int | tuple[int, int], keys: Sequence[str] = ("image", "mask", "roi"),
                 seed: int | None = None, foreground: float = 0.0):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        if not 0.0 <= foreground <= 1.0:
            raise ValueError(f"foreground must be in [0, 1], got {foreground}")
        self.keys = tuple(keys)
        self.foreground = float(foreground)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def _corner(self, sample: Sample, h: int, w: int) -> tuple[int, int]:
        ch, cw = self.size
        top_max, left_max = max(h, ch) - ch, max(w, cw) - cw
        if self.foreground > 0 and "mask" in sample:
            if float(torch.rand(1, generator=self.generator).item()) < self.foreground:
                fg = torch.as_tensor(sample["mask"])[0] > 0
                if "roi" in sample:
                    fg &= torch.as_tensor(sample["roi"])[0] > 0
                where = torch.nonzero(fg)
                if len(where):
                    y, x = where[_rng_int(len(where), self.generator)].tolist()
                    return min(max(0, y - ch // 2), top_max), min(max(0, x - cw // 2), left_max)
        return _rng_int(top_max + 1, self.generator), _rng_int(left_max + 1, self.generator)

    def __call__(self, sample: Sample) -> Sample:
        keys = [k for k in self.keys if k in sample]
        if not keys:
            return sample
        h, w = sample[keys[0]].shape[-2:]
        ch, cw = self.size
        ph, pw = max(0, ch - h), max(0, cw - w)
        top, left = self._corner(sample, h, w)
        out = dict(sample)
        for k in keys:
            x = torch.as_tensor(sample[k])
            if tuple(x.shape[-2:]) != (h, w):
                raise ValueError(f"PairedRandomCrop: '{k}' is {tuple(x.shape[-2:])}, '{keys[0]}' is {(h, w)}")
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
            out[k] = x[..., top:top + ch, left:left + cw]
        return out


class PairedRandomFlip:
    """Flip every key present along each axis in ``axes`` with probability ``prob`` (same draw for all keys).

    ``axes``: -1 flips left-right, -2 flips up-down.
    """

    def __init__(self, prob: float = 0.5, axes: Sequence[int] = (-1, -2),
                 keys: Sequence[str] = ("image", "mask", "roi"), seed: int | None = None):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if any(a not in (-1, -2) for a in axes):
            raise ValueError(f"axes must be -1 and/or -2, got {axes}")
        self.prob, self.axes, self.keys = prob, tuple(axes), tuple(keys)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, sample: Sample) -> Sample:
        draws = torch.rand(len(self.axes), generator=self.generator)
        dims = [a for a, u in zip(self.axes, draws.tolist(), strict=True) if u < self.prob]
        if not dims:
            return sample
        out = dict(sample)
        for k in self.keys:
            if k in sample:
                out[k] = torch.flip(torch.as_tensor(sample[k]), dims=dims)
        return out


class Compose:
    """Apply dictionary transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


class MapImage:
    """Wrap an image-only transform (tensor -> tensor, or -> list of views) as a dictionary transform."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        self.fn = fn

    def __call__(self, sample: Sample) -> Sample:
        return {**sample, "image": self.fn(sample["image"])}
