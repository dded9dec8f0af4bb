"""``segpairs:<images>,<masks>[,<roi>]`` and ``drive:[<path>]``: binary segmentation from paired folders.

Pairing: each image is paired with the mask (and roi) file of identical stem; failing that, with the
one whose first ``_``-separated stem token matches the image's (``21_training.tif`` <->
``21_manual1.gif``). No candidate (unpaired image or mask), several candidates, or one mask claimed
by two images raise :class:`DataError` (under ``skip_bad`` the image is skipped and counted).

Images are read as in :mod:`medpretrain.data.folder` (8-bit / 255, 16-bit / 65535, RGB -> grey by
ITU-R 601 luma when ``channels == 1``). Masks and rois: any non-zero pixel is 1 (``[1, H, W]`` in
{0, 1}); a mask or roi whose size differs from its image is an error. Without a roi folder the roi is
left unset (the dataset then reports an all-ones roi), unless ``data.derive_fov`` derives a field of view
from each image. The retinal options (``data.rgb_to_grey=green``, ``data.clahe``; :mod:`medpretrain.data.retina`)
apply at native size. Size: native unless ``image_size`` is set (then square; bilinear antialiased for
images, nearest for masks / rois).

Grouped splits: each pair keeps a 32x32 thumbnail of its native image (``Source.thumbs``, near-duplicate
grouping by ``data.dedup``) and its image file name (``Source.paths``, matched by ``data.group_regex``, e.g.
``(?P<group>sub-\\d+)_`` keeps ``sub-01_t1.png`` and ``sub-01_t2.png`` together); see
:mod:`medpretrain.data.splits`. DRIVE has an official split, so neither applies there.

DRIVE (Staal et al., IEEE TMI 2004): ``<path>/{training,test}/{images,1st_manual,mask}``; the
official 20 / 20 split; the field-of-view ``mask/`` is the roi (DRIVE scores inside it). The
validation images are carved out of training by :func:`medpretrain.data.splits.make_splits`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medpretrain.config import DataConfig
from medpretrain.data import retina
from medpretrain.data.base import LazyImages, Source
from medpretrain.data.duplicates import thumbnail
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.folder import (
    IMAGE_EXTENSIONS,
    list_images,
    load_image,
    load_mask,
    progress,
    stack_if_same,
)
from medpretrain.data.transforms import resize, to_channels

log = logging.getLogger(__name__)


def _token(stem: str) -> str:
    return stem.split("_", 1)[0]


def _listing(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(folder, f"{what} folder not found")
    files = list_images(folder)
    if not files:
        raise DataError(folder, f"no {what} files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def pair_files(images: list[Path], others: list[Path], what: str, skips: SkipLog) -> dict[Path, Path]:
    """Map each image to its ``what`` file (see the module docstring). Images left out were skipped."""
    by_stem = {p.stem: p for p in others}
    by_token: dict[str, list[Path]] = {}
    for p in others:
        by_token.setdefault(_token(p.stem), []).append(p)
    pairs: dict[Path, Path] = {}
    claimed: dict[Path, Path] = {}
    for img in images:
        match = by_stem.get(img.stem)
        if match is None:
            cands = by_token.get(_token(img.stem), [])
            if len(cands) > 1:
                skips.handle(DataError(img, f"ambiguous {what}: {', '.join(c.name for c in cands)} all match"))
                continue
            if not cands:
                skips.handle(DataError(img, f"no {what} file with stem '{img.stem}' or prefix "
                                            f"'{_token(img.stem)}_' in {others[0].parent}"))
                continue
            match = cands[0]
        if match in claimed:
            skips.handle(DataError(match, f"ambiguous {what}: pairs with both {claimed[match].name} and {img.name}"))
            continue
        claimed[match] = img
        pairs[img] = match
    for p in others:
        if p not in claimed:
            skips.handle(DataError(p, f"unpaired {what} file: no image matches it"))
    return pairs


def read_segpairs_source(image_dir: Path, mask_dir: Path, roi_dir: Path | None, cfg: DataConfig,
                         skips: SkipLog) -> Source:
    """Read paired images / masks (/ rois); see the module docstring."""
    images = _listing(image_dir, "image")
    mask_of = pair_files(images, _listing(mask_dir, "mask"), "mask", skips)
    roi_of = pair_files(images, _listing(roi_dir, "roi"), "roi", skips) if roi_dir is not None else None
    derive = roi_of is None and cfg.derive_fov
    rgb = retina.needs_rgb(cfg)
    xs, ms, rs, thumbs, names, files = [], [], [], [], [], []
    for img in progress(images, str(image_dir)):
        if img not in mask_of or (roi_of is not None and img not in roi_of):
            continue
        try:
            raw = load_image(img, 3 if rgb else cfg.channels, cfg.max_pixels)
            m = load_mask(mask_of[img], cfg.max_pixels)
            r = load_mask(roi_of[img], cfg.max_pixels) if roi_of is not None else None
            checks = [(mask_of[img], m)] + ([(roi_of[img], r)] if roi_of is not None and r is not None else [])
            for f, arr in checks:
                if arr.shape[1:] != raw.shape[1:]:
                    raise DataError(f, f"size {arr.shape[2]}x{arr.shape[1]} differs from image "
                                       f"{img.name} ({raw.shape[2]}x{raw.shape[1]})")
            try:
                x = retina.preprocess(raw, cfg)
            except ValueError as e:  # CLAHE on an image not larger than its grid
                raise DataError(img, f"retinal preprocessing: {e}") from None
        except DataError as err:
            skips.handle(err)
            continue
        # Of the native image before the retinal options: groups depend neither on image_size nor on them.
        thumbs.append(thumbnail(to_channels(raw, cfg.channels)))
        if derive:
            r = retina.field_of_view(raw, cfg.fov_threshold)
        if cfg.image_size:
            x = resize(x, cfg.image_size)
            m = resize(m, cfg.image_size, nearest=True)
            r = resize(r, cfg.image_size, nearest=True) if r is not None else None
        xs.append(x)
        ms.append(m)
        if r is not None:
            rs.append(r)
        names.append(img.name)
        files += [img, mask_of[img]] + ([roi_of[img]] if roi_of is not None else [])
    if not xs:
        raise DataError(image_dir, "no image / mask pair could be read")
    return Source(
        images=stack_if_same(xs), task="segmentation", names=names, files=files,
        masks=stack_if_same(ms),  # type: ignore[arg-type]
        rois=stack_if_same(rs) if roi_of is not None or derive else None,  # type: ignore[arg-type]
        class_names=["foreground"], skipped=list(skips.skipped), thumbs=np.stack(thumbs), paths=list(names),
    )


def _concat(a: list[np.ndarray] | np.ndarray, b: list[np.ndarray] | np.ndarray) -> list[np.ndarray] | np.ndarray:
    return stack_if_same(list(a) + list(b))


def read_drive_source(path: Path, cfg: DataConfig, skips: SkipLog) -> Source:
    """Read the DRIVE layout under ``path`` with its official training / test split."""
    if not path.is_dir():
        raise DataError(path, "DRIVE folder not found (expected <path>/training and <path>/test); "
                              "set MEDPRETRAIN_DATA or data.root")
    parts = [read_segpairs_source(path / s / "images", path / s / "1st_manual", path / s / "mask", cfg, skips)
             for s in ("training", "test")]
    train, test = parts
    assert not isinstance(train.images, LazyImages) and not isinstance(test.images, LazyImages)  # decoded above
    n_train = len(train)
    return Source(
        images=_concat(train.images, test.images), task="segmentation",
        names=[f"training/{n}" for n in train.names] + [f"test/{n}" for n in test.names],
        files=train.files + test.files,
        masks=_concat(train.masks, test.masks),  # type: ignore[arg-type]
        rois=_concat(train.rois, test.rois),  # type: ignore[arg-type]
        class_names=["vessel"],
        official_splits={"train": np.arange(n_train), "test": np.arange(n_train, n_train + len(test))},
        skipped=list(skips.skipped),
        thumbs=np.concatenate([train.thumbs, test.thumbs]),  # type: ignore[list-item]
    )
