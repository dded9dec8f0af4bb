"""Training loaders for image-only stages (pretraining, generative): the whole split on the device, or a DataLoader."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

log = logging.getLogger(__name__)


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per sample, 1 / the count of its class: with these weights every class is drawn equally often."""
    counts = torch.bincount(labels.long())
    return 1.0 / counts[labels.long()].double()


def image_loader(
    ds: Any, batch_size: int, cache_on_device: bool, device: torch.device, num_workers: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[DataLoader, torch.Generator, Callable[[Any], torch.Tensor]]:
    """A shuffling, ``drop_last`` loader (equal batches on every process, as the gathered NT-Xent
    needs), its sampler generator (re-seed per epoch for resumable order) and a function from a
    batch to images ``[B, C, H, W]`` on ``device``.

    With ``cache_on_device`` the loader yields indices into the split, stacked once on ``device``.
    ``weights`` (one per image, e.g. :func:`balanced_weights`): draw ``len(ds)`` images per epoch with
    replacement in proportion to them instead of a permutation.
    """
    if len(ds) < batch_size:
        raise ValueError(f"pretraining split has {len(ds)} images, fewer than batch_size={batch_size}")
    gen = torch.Generator()

    def sampler(source: Any) -> Sampler:
        if weights is None:
            return RandomSampler(source, generator=gen)
        return WeightedRandomSampler(weights, num_samples=len(ds), replacement=True, generator=gen)  # type: ignore[arg-type]

    if cache_on_device:
        on_disk = type(getattr(getattr(ds, "source", None), "images", None)).__name__
        if on_disk in ("CachedImages", "StreamedImages"):  # data.cache / data.stream: memory was to stay bounded
            log.warning("%s: train.cache_on_device stacks all %d images of the split into one float32 tensor on %s "
                        "(%.1f GB); set train.cache_on_device=false to read them in DataLoader workers",
                        getattr(ds, "spec", "data"), len(ds), device, len(ds) * ds[0]["image"].numel() * 4 / 1e9)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        loader = DataLoader(_Indices(len(ds)), batch_size=batch_size, sampler=sampler(range(len(ds))), drop_last=True)
        return loader, gen, lambda idx: images[idx.to(device)]
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler(ds), drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    return loader, gen, lambda batch: batch["image"].to(device, non_blocking=True)

