"""Segmentation pairs: real DRIVE, synthetic folders for pairing rules and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpretrain.config import DataConfig
from medpretrain.data import DataError, build_dataset, read_source


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_pairs(root: Path, stems: list[str], mask_stems: list[str], size=(12, 10)) -> None:
    rng = np.random.default_rng(0)
    for s in stems:
        save(root / "img" / f"{s}.png", rng.integers(0, 256, size, dtype=np.uint8))
    for s in mask_stems:
        save(root / "msk" / f"{s}.gif", (rng.random(size) > 0.7).astype(np.uint8) * 255)


def test_drive_official_split_masks_and_rois(data_root):
    cfg = DataConfig(dataset="drive:", root=str(data_root))
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 20)  # val carved from the 20 training images
    assert all(n.startswith("test/") for n in test.names) and not any(n.startswith("test/") for n in train.names)
    assert test.task == "segmentation" and test.num_classes == 1 and test.class_names == ["vessel"]
    item = test[0]
    assert item["image"].shape == (1, 584, 565) and item["mask"].shape == (1, 584, 565)
    assert item["roi"].shape == (1, 584, 565) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0} and set(item["roi"].unique().tolist()) == {0.0, 1.0}
    assert 0.05 < item["mask"].mean() < 0.2 and 0.6 < item["roi"].mean() < 0.75  # vessels inside the FOV
    with Image.open(data_root / "drive" / "test" / "1st_manual" / "01_manual1.gif") as gif:
        manual = np.asarray(gif) > 0
    assert test.names[0] == "test/01_test.tif" and np.array_equal(item["mask"][0].numpy(), manual)
    assert len(build_dataset(cfg, "all", unlabeled=True)) == 20
    assert set(build_dataset(cfg, "all", unlabeled=True)[0]) == {"image", "index"}


def test_drive_resized(data_root):
    cfg = DataConfig(dataset="drive:drive", root=str(data_root), image_size=64, channels=3)
    item = build_dataset(cfg, "test")[3]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert set(item["roi"].unique().tolist()) == {0.0, 1.0}


def test_segpairs_by_stem_and_by_token(tmp_path):
    make_pairs(tmp_path, ["a", "07_scan", "08_scan"], ["a", "07_manual", "08_manual"])
    src = read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))
    assert src.names == ["07_scan.png", "08_scan.png", "a.png"] and src.rois is None
    assert src.masks.shape == (3, 1, 12, 10) and set(np.unique(src.masks)) == {0.0, 1.0}
    ds = build_dataset(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), val_fraction=0.34,
                                  test_fraction=0.34), "test")
    assert torch.equal(ds[0]["roi"], torch.ones(1, 12, 10))  # no roi folder: everything counts


def test_segpairs_unpaired_image_and_mask(tmp_path):
    make_pairs(tmp_path, ["01_a", "02_a"], ["01_m"])
    with pytest.raises(DataError, match=r"02_a\.png: no mask file with stem '02_a' or prefix '02_'"):
        read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))
    make_pairs(tmp_path / "x", ["01_a"], ["01_m", "03_m"])
    with pytest.raises(DataError, match=r"03_m\.gif: unpaired mask file"):
        read_source(DataConfig(dataset="segpairs:x/img,x/msk", root=str(tmp_path)))
    src = read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), skip_bad=True))
    assert len(src) == 1 and len(src.skipped) == 1


def test_segpairs_ambiguous(tmp_path):
    make_pairs(tmp_path, ["05_a"], ["05_m1", "05_m2"])
    with pytest.raises(DataError, match=r"05_a\.png: ambiguous mask: 05_m1\.gif, 05_m2\.gif"):
        read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))


def test_mask_size_mismatch_and_bad_mask(tmp_path):
    make_pairs(tmp_path, ["1_a", "2_a"], ["1_m"])
    save(tmp_path / "msk" / "2_m.gif", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match=r"2_m\.gif: size 5x5 differs from image 2_a\.png \(10x12\)"):
        read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))
    (tmp_path / "msk" / "2_m.gif").write_bytes(b"")
    with pytest.raises(DataError, match=r"2_m\.gif: empty file"):
        read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))
    src = read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), skip_bad=True))
    assert src.names == ["1_a.png"] and [Path(p).name for p, _ in src.skipped] == ["2_m.gif"]


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="DRIVE folder not found"):
        read_source(DataConfig(dataset="drive:nowhere", root=str(tmp_path)))
    with pytest.raises(DataError, match="image folder not found"):
        read_source(DataConfig(dataset="segpairs:a,b", root=str(tmp_path)))


def test_drive_official_split_is_not_grouped(data_root):
    info = build_dataset(DataConfig(dataset="drive:", root=str(data_root)), "test").split_info
    assert (info["method"], info["dedup"], info["dedup_skipped"], info["sizes"]) == \
        ("official", "none", "official split", {"train": 18, "val": 2, "test": 20})


def test_segpairs_group_regex_and_planted_duplicate(tmp_path):
    rng = np.random.default_rng(1)
    for s in range(6):
        for k in range(2):
            stem = f"sub-{s:02d}_slice{k}"
            save(tmp_path / "img" / f"{stem}.png", rng.integers(0, 256, (12, 10), dtype=np.uint8))
            save(tmp_path / "msk" / f"{stem}.png", (rng.random((12, 10)) > 0.7).astype(np.uint8) * 255)
    copy = np.asarray(Image.open(tmp_path / "img" / "sub-00_slice0.png")).astype(int) + rng.integers(-2, 3, (12, 10))
    save(tmp_path / "img" / "extra.png", np.clip(copy, 0, 255).astype(np.uint8))  # a near-copy, no subject
    save(tmp_path / "msk" / "extra.png", np.zeros((12, 10), np.uint8))
    src = read_source(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path)))
    assert src.thumbs.shape == (13, 32, 32) and src.paths == src.names
    for seed in range(5):
        cfg = DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), group_regex=r"(sub-\d+)_|^extra",
                         split_seed=seed, val_fraction=0.2, test_fraction=0.3)
        sides = [set(build_dataset(cfg, s).names) for s in ("train", "val", "test")]
        for s in range(6):
            assert sum({f"sub-{s:02d}_slice0.png", f"sub-{s:02d}_slice1.png"} <= side for side in sides) == 1
        assert sum({"extra.png", "sub-00_slice0.png"} <= side for side in sides) == 1  # the near-copy joins
        info = build_dataset(cfg, "test").split_info
        assert (info["groups"], info["near_duplicate_pairs"], info["largest_group"]) == (6, 1, 3)
    with pytest.raises(DataError, match=r"^extra\.png: does not match data\.group_regex"):
        build_dataset(DataConfig(dataset="segpairs:img,msk", root=str(tmp_path), group_regex=r"(sub-\d+)_"), "train")
