"""build_dataset / read_source wiring: dispatch, cache, transforms, normalisation, empty splits."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpretrain.config import DataConfig
from medpretrain.data import (
    DataError,
    MapImage,
    Source,
    build_dataset,
    clear_source_cache,
    parse_spec,
    read_source,
)


def fake_source(n: int = 10) -> Source:
    images = np.linspace(0, 1, n * 4 * 4, dtype=np.float32).reshape(n, 1, 4, 4)
    return Source(images=images, task="binary", names=[f"s{i}" for i in range(n)], files=[],
                  labels=np.arange(n) % 2, class_names=["a", "b"])


@pytest.mark.parametrize("scheme, module, func", [
    ("dicom", "medpretrain.data.dicom", "read_dicom_source"),
    ("nifti", "medpretrain.data.nifti", "read_nifti_source"),
])
def test_dicom_and_nifti_dispatch(tmp_path, monkeypatch, scheme, module, func):
    calls = []

    def reader(path: Path, cfg: DataConfig, log) -> Source:
        calls.append((path, cfg.slice_axis, log.skip_bad))
        return fake_source()

    monkeypatch.setitem(__import__("sys").modules, module, types.SimpleNamespace(**{func: reader}))
    cfg = DataConfig(dataset=f"{scheme}:scans", root=str(tmp_path), skip_bad=True, slice_axis=1)
    ds = build_dataset(cfg, "test")
    assert calls == [(tmp_path / "scans", 1, True)] and len(ds) == 2 and ds.task == "binary"
    build_dataset(cfg, "train")
    assert len(calls) == 1  # decoded once per process
    build_dataset(DataConfig(dataset=f"{scheme}:scans", root=str(tmp_path), skip_bad=True, slice_axis=0), "test")
    assert len(calls) == 2  # slice_axis is part of the cache key
    clear_source_cache()


def test_spec_parsing(tmp_path):
    assert parse_spec("segpairs:a, /abs/b ,c", tmp_path).paths == (tmp_path / "a", Path("/abs/b"), tmp_path / "c")
    assert parse_spec("drive:", tmp_path).paths == (tmp_path / "drive",)
    spec = parse_spec("MedMNIST:ChestMNIST@128", tmp_path)
    assert (spec.scheme, spec.name, spec.size) == ("medmnist", "chestmnist", 128)
    with pytest.raises(DataError, match="segpairs:<images>,<masks>"):
        parse_spec("segpairs:only_one", tmp_path)


def test_transform_sees_unit_range_then_views_are_normalised(data_root):
    seen = []

    def two_views(x: torch.Tensor) -> list[torch.Tensor]:
        seen.append((float(x.min()), float(x.max())))
        return [x, x.flip(-1)]

    cfg = DataConfig(dataset="medmnist:pneumoniamnist", root=str(data_root), mean=0.25, std=0.5)
    ds = build_dataset(cfg, "val", unlabeled=True, transform=MapImage(two_views))
    views = ds[3]["image"]
    raw = build_dataset(cfg, "val", normalize=False)[3]["image"]
    assert 0.0 <= seen[0][0] and seen[0][1] <= 1.0
    torch.testing.assert_close(views[0], (raw - 0.25) / 0.5)
    torch.testing.assert_close(views[1], ((raw - 0.25) / 0.5).flip(-1))
    assert (ds.mean, ds.std) == (0.25, 0.5)


def test_empty_split_and_bad_options(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((5, 5), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=8, val_fraction=0.0)
    assert len(build_dataset(cfg, "test")) == 1
    with pytest.raises(DataError, match="split 'val' is empty"):
        build_dataset(cfg, "val")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        read_source(DataConfig(dataset=f"folder:{tmp_path}", channels=2))


def test_groups_are_found_once_per_source(tmp_path, monkeypatch):
    import medpretrain.data.splits as splits

    calls = []
    real = splits.near_pairs

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(splits, "near_pairs", counting)
    for i in range(6):
        Image.fromarray(np.full((5, 5), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.full((5, 5), 41, np.uint8)).save(tmp_path / "1b.png")  # RMS 1/255 from 1.png
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=8)
    parts = [build_dataset(cfg, s) for s in ("train", "val", "test", "train")]
    assert len(calls) == 1  # four datasets, one near-duplicate search
    assert parts[0].split_info == parts[2].split_info | {"sizes": parts[0].split_info["sizes"]}
    assert parts[0].split_info["near_duplicate_pairs"] == 1 and parts[0].split_info["groups"] == 6
    build_dataset(DataConfig(dataset=f"folder:{tmp_path}", image_size=8, dedup_threshold=0.5), "train")
    assert len(calls) == 2  # another threshold, another search; the decoded source is reused
    info = build_dataset(DataConfig(dataset=f"folder:{tmp_path}", image_size=8, dedup_threshold=0.5), "train").split_info
    assert len(calls) == 2 and info["groups"] == 1 and info["dedup_threshold"] == 0.5 and info["sizes"]["train"] == 7
    with pytest.raises(DataError, match=r"split 'val' is empty \(.*, 7 samples in 1 group\(s\)\)"):
        build_dataset(DataConfig(dataset=f"folder:{tmp_path}", image_size=8, dedup_threshold=0.5), "val")


def test_sources_without_thumbnails_are_not_deduplicated(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "medpretrain.data.dicom",
                        types.SimpleNamespace(read_dicom_source=lambda path, cfg, log: fake_source()))
    info = build_dataset(DataConfig(dataset="dicom:scans", root=str(tmp_path)), "test").split_info
    assert (info["method"], info["dedup"], info["groups"]) == ("stratified", "none", 10)
    assert "keeps no thumbnails" in info["dedup_skipped"]
    clear_source_cache()
