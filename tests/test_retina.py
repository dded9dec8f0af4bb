"""Retinal preprocessing (``data.rgb_to_grey=green``, ``data.clahe``, ``data.derive_fov``) on the real DRIVE images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpretrain.config import HASH_NEUTRAL, ConfigError, DataConfig, config_hash
from medpretrain.data import clear_source_cache, read_source, retina
from medpretrain.data.transforms import to_channels


def rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.moveaxis(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, -1, 0)


def gif_of(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im) > 0


def drive_files(data_root: Path, split: str, i: int) -> tuple[Path, Path, Path]:
    d = data_root / "drive" / split
    kind = "training" if split == "training" else "test"
    return d / "images" / f"{i:02d}_{kind}.tif", d / "1st_manual" / f"{i:02d}_manual1.gif", \
        d / "mask" / f"{i:02d}_{kind}_mask.gif"


def linked_drive(data_root: Path, tmp_path: Path, ids: tuple[int, ...] = (21, 22, 23)) -> Path:
    """A few real DRIVE training images, masks and fields of view linked into ``img/``, ``msk/``, ``fov/``
    (a ``segpairs:img,msk[,fov]`` folder that decodes in a fraction of the whole set's time)."""
    for i in ids:
        for folder, f in zip(("img", "msk", "fov"), drive_files(data_root, "training", i), strict=True):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f.name).symlink_to(f)
    return tmp_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def vessel_contrast(x: np.ndarray, vessels: np.ndarray, fov: np.ndarray) -> float:
    """Mean background minus mean vessel level inside the field of view (vessels are dark)."""
    return float(x[0][fov & ~vessels].mean() - x[0][fov & vessels].mean())


def test_derived_field_of_view_matches_every_official_drive_mask(data_root):
    scores = []
    for split, ids in (("training", range(21, 41)), ("test", range(1, 21))):
        for i in ids:
            image, _, mask = drive_files(data_root, split, i)
            fov = retina.field_of_view(rgb_of(image))
            assert fov.shape == (1, 584, 565) and set(np.unique(fov)) == {0.0, 1.0}
            scores.append(dice(fov[0] > 0, gif_of(mask)))
    assert len(scores) == 40 and min(scores) >= 0.98, min(scores)
    assert np.mean(scores) >= 0.99


def test_segpairs_without_rois_derives_the_field_of_view(data_root, tmp_path):
    """``segpairs:<images>,<masks>`` (no roi folder) on real DRIVE images: off, the roi is all ones; on, each roi
    matches the official mask the reader was not given; given rois win."""
    root = str(linked_drive(data_root, tmp_path))
    assert read_source(DataConfig(dataset="segpairs:img,msk", root=root)).rois is None
    src = read_source(DataConfig(dataset="segpairs:img,msk", root=root, derive_fov=True))
    assert src.names == ["21_training.tif", "22_training.tif", "23_training.tif"] and src.rois.shape == (3, 1, 584, 565)
    for name, roi in zip(src.names, src.rois, strict=True):
        assert dice(roi[0] > 0, gif_of(tmp_path / "fov" / name.replace(".tif", "_mask.gif"))) >= 0.98, name
    given = read_source(DataConfig(dataset="segpairs:img,msk,fov", root=root, derive_fov=True))
    assert np.array_equal(given.rois[0][0] > 0, gif_of(tmp_path / "fov" / "21_training_mask.gif"))
    # Resized with the image, nearest neighbour.
    small = read_source(DataConfig(dataset="segpairs:img,msk", root=root, derive_fov=True, image_size=64))
    assert small.rois.shape == (3, 1, 64, 64) and set(np.unique(small.rois)) == {0.0, 1.0}


def test_green_channel_is_the_tiffs_green_plane_and_raises_vessel_contrast(data_root, tmp_path):
    image, manual, mask = drive_files(data_root, "training", 21)
    rgb, vessels, fov = rgb_of(image), gif_of(manual), gif_of(mask)
    green = retina.green(rgb)
    assert np.array_equal(green, rgb[1:2]) and np.array_equal(retina.green(green), green)
    luma = to_channels(rgb, 1)
    assert vessel_contrast(green, vessels, fov) > 1.3 * vessel_contrast(luma, vessels, fov)  # 0.038 vs 0.026

    root = str(linked_drive(data_root, tmp_path, (21,)))

    def first_image(**opts: object) -> np.ndarray:
        return read_source(DataConfig(dataset="segpairs:img,msk,fov", root=root, **opts)).images[0]

    assert np.array_equal(first_image(rgb_to_grey="green"), rgb[1:2])  # cached sources keep the options apart
    assert np.allclose(first_image(), luma, atol=1e-6)
    assert np.array_equal(first_image(rgb_to_grey="green", channels=3), np.repeat(rgb[1:2], 3, axis=0))
    assert np.array_equal(first_image(channels=3), rgb)


def test_clahe_is_opencvs_equalisation_and_limits_the_stretch():
    rng = np.random.default_rng(0)
    x = rng.beta(2, 5, (1, 33, 34)).astype(np.float32)
    # One tile, no clipping: global histogram equalisation with OpenCV's 8-bit LUT, round(255 * cdf / N) / 255.
    levels = np.floor(x * 255).astype(int)
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256))
    assert np.allclose(retina.clahe(x, clip=0.0, grid=1), np.round(cdf * 255 / x.size)[levels] / 255, atol=1e-6)
    # A flat image in [0.4, 0.5): equalisation spreads it over [0, 1]; clip 2 caps each level's slope at about 2
    # and spreads the clipped excess over all 256 levels, so the span is about 26 * (2 + 0.8) / 256 = 0.28.
    flat = rng.uniform(0.4, 0.5, (1, 64, 64)).astype(np.float32)
    he, limited = retina.clahe(flat, clip=0.0, grid=1), retina.clahe(flat, clip=2.0, grid=1)
    assert np.ptp(he) > 0.95 and 0.25 < np.ptp(limited) < 0.32
    assert np.all(np.diff(limited.ravel()[np.argsort(flat.ravel())]) >= -1e-6)  # monotone in the input level
    with pytest.raises(ValueError, match="grid"):
        retina.clahe(np.zeros((1, 4, 4), np.float32), grid=8)


def test_clahe_option_applies_after_the_green_channel_and_raises_vessel_contrast(data_root, tmp_path):
    image, manual, mask = drive_files(data_root, "training", 21)
    rgb, vessels, fov = rgb_of(image), gif_of(manual), gif_of(mask)
    root = str(linked_drive(data_root, tmp_path, (21,)))
    got = read_source(DataConfig(dataset="segpairs:img,msk,fov", root=root, rgb_to_grey="green", clahe=True)).images[0]
    assert np.allclose(got, retina.clahe(rgb[1:2], 2.0, 8), atol=1e-6)
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert vessel_contrast(got, vessels, fov) > 2 * vessel_contrast(rgb[1:2], vessels, fov)  # 0.112 vs 0.038
    coarse = read_source(DataConfig(dataset="segpairs:img,msk,fov", root=root, rgb_to_grey="green", clahe=True,
                                    clahe_grid=2, clahe_clip=4.0)).images[0]
    assert np.allclose(coarse, retina.clahe(rgb[1:2], 4.0, 2), atol=1e-6) and not np.allclose(coarse, got, atol=1e-3)


def test_a_tiny_image_under_clahe_is_one_line_naming_the_file(tmp_path):
    for d in ("img", "msk"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.full((6, 5), 100, np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.full((6, 5), 255, np.uint8)).save(tmp_path / "msk" / "a.png")
    clear_source_cache()
    with pytest.raises(Exception, match=r"a\.png: retinal preprocessing: .*grid") as err:
        read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), clahe=True))
    assert "\n" not in str(err.value)


def test_retinal_options_are_refused_elsewhere_and_checked(data_root):
    with pytest.raises(ConfigError, match=r"^data.rgb_to_grey=green: retinal preprocessing applies to segpairs: "
                                          r"and drive: datasets only, not medmnist:$"):
        read_source(DataConfig(dataset="medmnist:pneumoniamnist", root=str(data_root), rgb_to_grey="green"))
    with pytest.raises(ConfigError, match="clahe_grid >= 1"):
        DataConfig(clahe_grid=0)
    with pytest.raises(ConfigError, match="fov_threshold must be in"):
        DataConfig(fov_threshold=1.0)


def test_the_retinal_options_keep_every_hash_at_their_defaults():
    assert set(retina.OPTIONS) <= set(HASH_NEUTRAL["DataConfig"])
    assert all(HASH_NEUTRAL["DataConfig"][k] == getattr(DataConfig(), k) for k in retina.OPTIONS)
    assert retina.active_options(DataConfig()) == {}
    base = config_hash(DataConfig())
    for k, v in {"rgb_to_grey": "green", "clahe": True, "clahe_clip": 3.0, "clahe_grid": 4, "derive_fov": True,
                 "fov_threshold": 0.2}.items():
        assert config_hash(DataConfig(**{k: v})) != base, k
