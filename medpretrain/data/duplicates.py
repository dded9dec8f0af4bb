"""Near-duplicate images, found before splitting so that copies of one scan never straddle train and test.

Every ``folder:`` and ``segpairs:`` reader keeps a :func:`thumbnail` per sample (``Source.thumbs``):
the image at its native resolution, grey (ITU-R 601 luma), resized to 32x32 (bilinear, antialiased),
in [0, 1]. It does not depend on ``data.image_size`` or ``data.channels``, so every stage of an
experiment (pretraining at 64 px, fine-tuning at 224 px) finds the same groups and the same test set.

Two measures (``data.dedup``), each with its threshold (``data.dedup_threshold``; ``None`` = the default):

* ``pixels``: root-mean-square difference of the thumbnails, ``sqrt(mean((a - b)**2))``; a pair is a
  near-duplicate at ``<= 0.05`` (:data:`DEFAULT_THRESHOLDS`), the measure issue 14 used. Why 0.05 on
  BUSI: the pair distances thin out between 0.04 and 0.08 (per 0.01: 23 pairs in (0.03, 0.04], 12, 14,
  then 27 in (0.06, 0.08]) before rising (153 in (0.08, 0.10]); at 0.05 the 215 pairs give 142 groups of
  2-7 images, at 0.10 the chains already make a group of 24 and at 0.15 one of 712. Some frames of one
  lesion lie beyond it (``benign (125)`` / ``(126)``: RMS 0.087), so a larger value catches more copies at
  the price of merging distinct images.
* ``phash``: the DCT perceptual hash of ``imagehash`` (Zauner 2010; 64 bits, computed on the thumbnail,
  which is the 32x32 input ``imagehash.phash`` resizes to), Hamming distance ``<= 8`` bits. On BUSI it
  finds 217 pairs, 214 of them within RMS 0.05; it is insensitive to global brightness and contrast
  changes, which the pixel distance is not.

Pairs are merged transitively (union-find): a chain ``a ~ b ~ c`` is one group even if ``a`` and ``c`` are
far apart. Cost: all pairs, in blocks of :data:`BLOCK` rows (one matrix product per block), so memory stays
``O(BLOCK * N)`` and time grows as ``N**2``. Measured on BUSI (780 images, one thread, on a 2-core machine
shared with other jobs): ``pixels`` 0.06 s, ``phash`` 0.3 s (hashing included); decoding the 780 PNGs took
6.5-11 s there, of which the thumbnails about 1 s (10%). 5000 images: 2.8 s (``pixels``). The search runs
once per decoded source and options (:func:`medpretrain.data.dataset.source_groups` caches it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

DedupMethod = Literal["pixels", "phash", "none"]
DEDUP_METHODS: tuple[str, ...] = ("pixels", "phash", "none")
DEFAULT_THRESHOLDS: dict[str, float] = {"pixels": 0.05, "phash": 8}
THUMB_SIZE = 32
BLOCK = 512


def thumbnail(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` float in [0, 1] (C in 1, 3) -> ``[32, 32]`` float32 grey, see the module docstring."""
    from medpretrain.data.transforms import resize, to_channels  # torch-free import of the split logic

    return resize(to_channels(image, 1), THUMB_SIZE)[0]


def phash_bits(thumbs: np.ndarray) -> np.ndarray:
    """``[N, 32, 32]`` thumbnails -> ``[N, 64]`` bool pHash bits (``imagehash.phash``)."""
    import imagehash
    from PIL import Image

    u8 = np.clip(np.rint(np.asarray(thumbs, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if len(u8) == 0:
        return np.zeros((0, 64), dtype=bool)
    return np.stack([imagehash.phash(Image.fromarray(t)).hash.reshape(-1) for t in u8])


def threshold_for(method: str, threshold: float | None) -> float:
    """``threshold``, or the method's default; raises ValueError for an unknown method or a negative value."""
    if method not in DEFAULT_THRESHOLDS:
        raise ValueError(f"near-duplicate method must be one of {', '.join(DEFAULT_THRESHOLDS)}, got {method!r}")
    value = DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)
    if not value >= 0:
        raise ValueError(f"data.dedup_threshold must be >= 0, got {threshold}")
    return value


def near_pairs(thumbs: np.ndarray, method: str, threshold: float | None = None) -> np.ndarray:
    """Pairs ``[M, 2]`` (``i < j``, sorted) of samples within ``threshold`` under ``method``.

    ``pixels``: candidates from a float32 matrix product, confirmed in float64 (exact RMS); ``phash``:
    Hamming distance from a product of the +-1 bit vectors (exact in float32).
    """
    thr = threshold_for(method, threshold)
    n = len(thumbs)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if method == "phash":
        feats = np.where(phash_bits(thumbs), 1.0, -1.0).astype(np.float32)
        sq = None
    else:
        feats = np.asarray(thumbs, dtype=np.float32).reshape(n, -1)
        sq = (feats.astype(np.float64) ** 2).sum(axis=1)
    dim = feats.shape[1]
    found = []
    for start in range(0, n, BLOCK):
        block = feats[start:start + BLOCK]
        dots = block @ feats.T  # [b, n]
        upper = np.arange(n)[None, :] > np.arange(start, start + len(block))[:, None]
        if sq is None:
            i, j = np.nonzero(upper & ((dim - dots) / 2.0 <= thr))  # Hamming distance
        else:
            mse = (sq[start:start + len(block), None] + sq[None, :] - 2.0 * dots) / dim
            i, j = np.nonzero(upper & (mse <= (thr * 1.01) ** 2 + 1e-6))  # float32 candidates, a margin wide
            exact = np.sqrt(((feats[i + start].astype(np.float64) - feats[j]) ** 2).mean(axis=1))
            i, j = i[exact <= thr], j[exact <= thr]
        found.append(np.stack([i + start, j], axis=1))
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by ``pairs`` ``[M, 2]``: ``[n]`` int64 labels, each the
    smallest index of its component (so the labels do not depend on the order of the pairs)."""
    parent = np.arange(n, dtype=np.int64)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return int(root)

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def key_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs ``[M, 2]`` that chain together the samples sharing a key (patient, regex group)."""
    _, inverse = np.unique(np.asarray(keys), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    same = inverse[order][1:] == inverse[order][:-1]
    return np.stack([order[:-1][same], order[1:][same]], axis=1).astype(np.int64)
