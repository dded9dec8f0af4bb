"""Class conditioning shared by the generators: label checks, the class embedding concatenated to a latent,
the per-class sampling seed and the labels of sample grids.

A conditional model learns p(x | class) for the K single-label classes of its training data (K >= 2);
labels are int64 class indices into the ``class_names`` its checkpoint metadata records.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from medpretrain.generative.geometry import check_positive


def class_embedding_size(num_classes: int, class_dim: int | None, default: int) -> tuple[int, int]:
    """``(num_classes, class embedding width)`` of a conditional decoder / generator: ``class_dim`` or
    ``default``, and 0 when unconditional (``num_classes`` 0). ``ValueError`` for one class or fewer than 0."""
    if num_classes < 0 or num_classes == 1:
        raise ValueError(f"num_classes must be 0 (unconditional) or at least 2, got {num_classes}")
    if not num_classes:
        return 0, 0
    dim = default if class_dim is None else class_dim
    check_positive(class_dim=dim)
    return num_classes, dim


def with_class(z: Tensor, y: Tensor | None, embed: nn.Embedding | None, what: str) -> Tensor:
    """``z`` with the class embedding of labels ``y [B]`` concatenated (``[B, D + class_dim]``), or ``z``
    itself for an unconditional module. ``ValueError`` when labels are missing, superfluous or of another
    length."""
    if embed is None:
        if y is not None:
            raise ValueError(f"this {what} is unconditional (num_classes=0) but was given class labels")
        return z
    return torch.cat([z, embed(check_labels(y, len(z), embed.num_embeddings, what)).to(z.dtype)], dim=1)


def check_labels(y: Tensor | None, n: int, num_classes: int, what: str) -> Tensor:
    """``y`` if it is ``n`` integer labels, else ``ValueError`` (the range 0..``num_classes``-1 is left to
    ``nn.Embedding``, which raises ``IndexError``: checking it here would synchronise a GPU every step)."""
    if y is None:
        raise ValueError(f"this {what} is class-conditional ({num_classes} classes): pass class labels")
    if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} expects integer labels of shape [{n}], got {y.dtype} {list(y.shape)}")
    return y


def class_seed(seed: int, class_index: int) -> int:
    """The sampling seed of class ``class_index`` under run seed ``seed`` (a 63-bit integer from numpy's
    ``SeedSequence([seed, class_index])``), so the latents / noise of one class's samples do not depend on
    which other classes are drawn. ``ValueError`` for negative arguments."""
    if seed < 0 or class_index < 0:
        raise ValueError(f"seed and class index must be >= 0, got {seed} and {class_index}")
    state = np.random.SeedSequence([seed, class_index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def grid_labels(n: int, num_classes: int) -> Tensor | None:
    """Labels of an ``n``-image grid cycling through the classes (``0, 1, .., K-1, 0, ..``), or ``None`` for
    an unconditional model (``num_classes`` 0)."""
    return torch.arange(n, dtype=torch.int64) % num_classes if num_classes else None
