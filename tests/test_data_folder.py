"""Folder and CSV-manifest readers: real BUSI, synthetic files for formats and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpretrain.config import DataConfig
from medpretrain.data import DataError, build_dataset, read_source
from medpretrain.data.dataset import split_indices
from medpretrain.data.folder import load_image

BUSI_COUNTS = [437, 210, 133]  # benign, malignant, normal


def busi_cfg(root: Path, spec: str, **kw) -> DataConfig:
    return DataConfig(dataset=spec, root=str(root), image_size=64, **kw)


def save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def grey(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("spec", ["folder:busi", "folder:busi/all_captions.csv"])
def test_busi_folder_and_manifest(data_root, spec):
    cfg = busi_cfg(data_root, spec)
    parts = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    train = parts["train"]
    assert sum(len(p) for p in parts.values()) == 780
    assert (train.num_classes, train.class_names, train.in_channels) == (3, ["benign", "malignant", "normal"], 1)
    assert train[0]["image"].shape == (1, 64, 64)
    all_labels = np.concatenate([p.labels for p in parts.values()])
    assert np.bincount(all_labels).tolist() == BUSI_COUNTS
    names = [set(p.names) for p in parts.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    for s, frac in (("test", 0.2), ("val", 0.1)):
        assert np.all(np.abs(np.bincount(parts[s].labels) - frac * np.array(BUSI_COUNTS)) <= 1)
    assert "benign (1).png" in set().union(*names)  # spaces and parentheses
    assert len(train.fingerprint) == 16 and train.skipped == []


def test_busi_rgb_that_is_grey_and_coloured_marks(data_root):
    plain = data_root / "busi" / "benign" / "benign (1).png"
    rgb = read_png(plain)
    assert rgb.ndim == 3 and (rgb[..., 0] == rgb[..., 1]).all()
    np.testing.assert_array_equal(load_image(plain, 1)[0], rgb[..., 0] / np.float32(255))  # exact
    marked = data_root / "busi" / "benign" / "benign (102).png"  # one of the 15 with coloured marks
    rgb = read_png(marked).astype(np.float32) / 255
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(load_image(marked, 1)[0], luma, atol=1e-6)


def test_formats_names_and_channels(tmp_path):
    img = grey()
    save(tmp_path / "a b" / "x (1).png", img)
    save(tmp_path / "a b" / "x (2).jpg", img, quality=100)
    save(tmp_path / "a b" / "x (3).bmp", img)
    save(tmp_path / "c" / "y.tif", img)
    save(tmp_path / "c" / "y.gif", img)
    rgb = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    save(tmp_path / "c" / "z.png", rgb)
    (tmp_path / "c" / "notes.txt").write_text("ignored")
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=24)
    src = read_source(cfg)
    assert src.names == ["x (1).png", "x (2).jpg", "x (3).bmp", "y.gif", "y.tif", "z.png"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1] and src.class_names == ["a b", "c"] and src.task == "binary"
    luma = (rgb.astype(np.float32) / 255) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(load_image(tmp_path / "c" / "z.png", 1)[0], luma, atol=1e-6)
    three = load_image(tmp_path / "a b" / "x (1).png", 3)
    assert three.shape == (3, 20, 24) and np.array_equal(three[0], three[2])


def test_sixteen_bit_scaled_by_dtype_range(tmp_path):
    a = np.full((8, 8), 1000, np.uint16)
    a[0, 0] = 3000
    for ext in ("png", "tif"):
        x = load_image(save(tmp_path / f"d.{ext}", a), 1)
        assert x.dtype == np.float32 and x.max() == pytest.approx(3000 / 65535) and x.min() == pytest.approx(1000 / 65535)


def test_float_tiff_nan_is_error_constant_is_fine(tmp_path):
    nan = np.ones((6, 6), np.float32)
    nan[2, 2] = np.nan
    with pytest.raises(DataError, match=r"nan\.tif: image contains NaN"):
        load_image(save(tmp_path / "nan.tif", nan), 1)
    const = load_image(save(tmp_path / "const.png", np.full((6, 6), 77, np.uint8)), 1)
    assert np.all(const == np.float32(77 / 255))


def test_unlabeled_folder(tmp_path):
    for i in range(3):
        save(tmp_path / f"im{i}.png", grey(seed=i))
    ds = build_dataset(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, test_fraction=0.34, val_fraction=0.33), "train")
    assert ds.task == "unlabeled" and ds.labels is None and set(ds[0]) == {"image", "index"}


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no images found"):
        read_source(DataConfig(dataset=f"folder:{tmp_path / 'empty'}"))


def make_bad_folder(root: Path) -> None:
    for i in range(4):
        save(root / "ok" / f"good{i}.png", grey(seed=i))
        save(root / "other" / f"fine{i}.png", grey(seed=10 + i))
    (root / "ok" / "zero.png").write_bytes(b"")
    (root / "ok" / "text.png").write_text("this is not an image\n")
    data = (root / "other" / "fine0.png").read_bytes()
    (root / "other" / "truncated.png").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, reason", [
    ("zero.png", "empty file"), ("text.png", "not a readable image"), ("truncated.png", "corrupt or truncated"),
])
def test_bad_files_raise_naming_the_file(tmp_path, name, reason):
    make_bad_folder(tmp_path)
    (tmp_path / "solo").mkdir()
    src = next(tmp_path.rglob(name))
    (tmp_path / "solo" / name).write_bytes(src.read_bytes())
    with pytest.raises(DataError) as e:
        read_source(DataConfig(dataset=f"folder:{tmp_path / 'solo'}"))
    assert name in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)


def test_skip_bad_counts_and_logs_once(tmp_path, caplog):
    make_bad_folder(tmp_path)
    with pytest.raises(DataError, match="text.png: not a readable image"):  # first bad file in order
        read_source(DataConfig(dataset=f"folder:{tmp_path}", image_size=16))
    caplog.set_level(logging.WARNING, logger="medpretrain.data")
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=16, skip_bad=True, val_fraction=0.25, test_fraction=0.25)
    ds = build_dataset(cfg, "train")
    build_dataset(cfg, "test")
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["text.png", "truncated.png", "zero.png"]
    assert len(ds.source) == 8
    warnings = [r for r in caplog.records if "skipped 3 bad file(s)" in r.getMessage()]
    assert len(warnings) == 1


def write_manifest(path: Path, rows: list[str], header: str = "image_path,label,patient") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_manifest_patients_and_integer_labels(tmp_path):
    rows = []
    for i in range(12):
        save(tmp_path / "img" / f"p{i // 2} s{i}.png", grey(seed=i))
        rows.append(f"img/p{i // 2} s{i}.png,{i % 2},P{i // 2}")
    cfg = DataConfig(dataset=str("folder:" + str(write_manifest(tmp_path / "m.csv", rows))), image_size=8,
                     val_fraction=0.17, test_fraction=0.17)
    src = read_source(cfg)
    assert src.class_names == ["0", "1"] and src.groups is not None and len(set(src.groups)) == 6
    assert "P0" not in set(src.groups)  # salted keys, not raw ids
    parts = {s: set(src.groups[build_dataset(cfg, s).indices]) for s in ("train", "val", "test")}
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])


def test_manifest_label_out_of_range_and_missing_column(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", grey(seed=i))
    bad = write_manifest(tmp_path / "bad.csv", ["0.png,0", "1.png,1", "2.png,7"], header="image_path,label")
    with pytest.raises(DataError, match=r"bad\.csv: row 4: label 7 out of range 0\.\.2"):
        read_source(DataConfig(dataset=f"folder:{bad}"))
    src = read_source(DataConfig(dataset=f"folder:{bad}", skip_bad=True, image_size=8))
    assert len(src) == 2 and len(src.skipped) == 1
    nocol = write_manifest(tmp_path / "nocol.csv", ["0.png"], header="path")
    with pytest.raises(DataError, match="nocol.csv: manifest needs an 'image_path' column"):
        read_source(DataConfig(dataset=f"folder:{nocol}"))
    missing = write_manifest(tmp_path / "missing.csv", ["0.png,a", "gone.png,b"], header="image_path,label")
    with pytest.raises(DataError, match="gone.png: cannot read file"):
        read_source(DataConfig(dataset=f"folder:{missing}"))


def test_thumbnails_and_paths_for_grouped_splits(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    save(tmp_path / "a" / "sub-1" / "x.png", colour)
    save(tmp_path / "a" / "y.png", grey(40, 36, seed=1))
    save(tmp_path / "b" / "z.png", grey(40, 36, seed=2))
    src = read_source(DataConfig(dataset=f"folder:{tmp_path}", image_size=8))
    assert src.paths == ["a/sub-1/x.png", "a/y.png", "b/z.png"] and src.names == ["x.png", "y.png", "z.png"]
    assert src.thumbs.shape == (3, 32, 32) and src.thumbs.dtype == np.float32
    # Thumbnails come from the native image: the same whatever image_size and channels (so every stage of an
    # experiment finds the same groups and the same test set).
    for kw in ({"image_size": 64}, {"image_size": 8, "channels": 3}):
        np.testing.assert_allclose(read_source(DataConfig(dataset=f"folder:{tmp_path}", **kw)).thumbs, src.thumbs,
                                   atol=1e-6)
    luma = colour.astype(np.float64) @ [0.299, 0.587, 0.114] / 255
    assert abs(src.thumbs[0].mean() - luma.mean()) < 2e-3  # grey by luma, area-preserving resize
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_path,label\n" + "a/y.png,0\n" + f"{tmp_path / 'b' / 'z.png'},1\n")
    src = read_source(DataConfig(dataset=f"folder:{manifest}", image_size=8))
    assert src.paths == ["a/y.png", str(tmp_path / "b" / "z.png")]  # as written in the manifest


def test_manifest_patients_combine_with_near_duplicates(tmp_path):
    rows = []
    for i in range(12):
        save(tmp_path / "img" / f"s{i}.png", grey(seed=i))
        rows.append(f"img/s{i}.png,{i % 2},P{i // 2}")
    save(tmp_path / "img" / "s0 again.png", grey(seed=0))  # patient P5's image is a copy of P0's
    rows.append("img/s0 again.png,0,P5")
    cfg = DataConfig(dataset="folder:" + str(write_manifest(tmp_path / "m.csv", rows)), image_size=8,
                     val_fraction=0.17, test_fraction=0.17)
    info = build_dataset(cfg, "train").split_info
    assert (info["groups"], info["near_duplicate_pairs"], info["largest_group"], info["patient_keys"]) == (5, 1, 5, True)
    for seed in range(6):
        sides = [set(build_dataset(DataConfig(**{**cfg.__dict__, "split_seed": seed}), s).names)
                 for s in ("train", "val", "test")]
        assert sum({"s0.png", "s1.png", "s10.png", "s11.png", "s0 again.png"} <= side for side in sides) == 1


# Leakage-free splits on real BUSI (issue 14, item 8); the split logic's unit tests are in test_data_splits.py.


def _busi_rms(src) -> np.ndarray:
    t = src.thumbs.reshape(len(src), -1).astype(np.float64)
    sq = (t ** 2).sum(1)
    return np.sqrt(np.maximum((sq[:, None] + sq[None] - 2 * t @ t.T) / t.shape[1], 0))


def test_busi_grouped_split_leaves_no_test_image_near_a_training_image(data_root):
    cfg = DataConfig(dataset="folder:busi", root=str(data_root), image_size=64)  # dedup=pixels by default
    src = read_source(cfg)
    dist = _busi_rms(src)
    info = build_dataset(cfg, "test").split_info
    # Measured on BUSI (780 images): 215 pairs within RMS 0.05 join 320 images into 142 groups.
    assert (info["groups"], info["multi_image_groups"], info["images_in_multi_image_groups"], info["largest_group"],
            info["near_duplicate_pairs"], info["dedup_threshold"]) == (602, 142, 320, 7, 215, 0.05)
    assert int((dist[np.triu_indices(len(dist), 1)] <= 0.05).sum()) == 215  # the pairs, recounted naively
    for seed in (0, 1, 2):
        parts = split_indices(src, DataConfig(dataset="folder:busi", root=str(data_root), image_size=64,
                                              split_seed=seed))
        seen = np.concatenate([parts["train"], parts["val"]])
        assert int((dist[np.ix_(parts["test"], seen)].min(1) <= 0.05).sum()) == 0, seed
        assert int((dist[np.ix_(parts["val"], parts["train"])].min(1) <= 0.05).sum()) == 0, seed
        assert [np.bincount(src.labels[parts[s]]).tolist() for s in ("train", "val", "test")] == \
            [[306, 147, 93], [44, 21, 13], [87, 42, 27]]  # still stratified to the sample
    plain = split_indices(src, DataConfig(dataset="folder:busi", root=str(data_root), image_size=64, dedup="none"))
    seen = np.concatenate([plain["train"], plain["val"]])
    assert int((dist[np.ix_(plain["test"], seen)].min(1) <= 0.05).sum()) == 47  # the leak without grouping
    ph = build_dataset(DataConfig(dataset="folder:busi", root=str(data_root), image_size=64, dedup="phash"),
                       "test").split_info
    assert (ph["groups"], ph["multi_image_groups"], ph["near_duplicate_pairs"], ph["dedup_threshold"]) == (600, 144,
                                                                                                          217, 8)


def test_busi_cv_folds_keep_near_duplicates_together(data_root):
    src = read_source(DataConfig(dataset="folder:busi", root=str(data_root), image_size=64))
    dist = _busi_rms(src)
    tests = []
    for fold in range(5):
        cfg = DataConfig(dataset="folder:busi", root=str(data_root), image_size=64, cv_folds=5, cv_fold=fold)
        parts = split_indices(src, cfg)
        seen = np.concatenate([parts["train"], parts["val"]])
        assert int((dist[np.ix_(parts["test"], seen)].min(1) <= 0.05).sum()) == 0, fold
        assert np.all(np.abs(np.bincount(src.labels[parts["test"]]) - np.array([437, 210, 133]) / 5) <= 1)
        tests.append(parts["test"])
    assert sorted(np.concatenate(tests).tolist()) == list(range(780))
    assert build_dataset(cfg, "test").split_info["method"] == "cv"
