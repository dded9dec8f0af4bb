"""MedMNIST reader and dataset contract: real PneumoniaMNIST, synthetic npz files for edge cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.config import DataConfig
from medpretrain.data import DataError, build_dataset, read_source
from medpretrain.utils import sha256_file


def pneu(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="medmnist:pneumoniamnist", root=str(root), **kw)


def write_npz(path: Path, n=(6, 3, 3), size=28, k=1, rgb=False, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (count, k), dtype=np.uint8)
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_pneumoniamnist_official_splits_and_counts(data_root):
    sizes, counts = {}, {}
    for split in ("train", "val", "test"):
        ds = build_dataset(pneu(data_root), split)
        sizes[split], counts[split] = len(ds), np.bincount(ds.labels).tolist()
    assert sizes == {"train": 3882, "val": 524, "test": 624}
    assert counts == {"train": [388, 3494], "val": [135, 389], "test": [234, 390]}
    assert (ds.task, ds.num_classes, ds.class_names, ds.in_channels) == ("binary", 2, ["normal", "pneumonia"], 1)
    assert ds.fingerprint == sha256_file(data_root / "pneumoniamnist" / "pneumoniamnist_28.npz")[:16]
    assert ds.names[0] == "pneumoniamnist_28.npz[test:0]"


def test_pneumoniamnist_item_and_normalisation(data_root):
    ds = build_dataset(pneu(data_root), "test")
    item = ds[5]
    assert set(item) == {"image", "label", "index"}
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and item["index"] == 5
    raw = np.load(data_root / "pneumoniamnist" / "pneumoniamnist_28.npz")["test_images"][5]
    np.testing.assert_allclose(item["image"][0].numpy(), raw / 255.0 * 2 - 1, atol=1e-6)
    images = torch.stack([ds[i]["image"] for i in range(50)])
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.9 and images.max() > 0.9
    plain = build_dataset(pneu(data_root), "test", normalize=False)[5]["image"]
    assert 0.0 <= plain.min() and plain.max() <= 1.0
    torch.testing.assert_close(plain * 2 - 1, item["image"])


def test_unlabeled_and_all_split(data_root):
    ds = build_dataset(pneu(data_root, label_fraction=0.1), "all", unlabeled=True)
    assert len(ds) == 3882 + 524  # never the test split, label_fraction ignored
    assert "label" not in ds[0] and ds.labels is None and ds.task == "unlabeled"


def test_resize_and_three_channels(data_root):
    ds = build_dataset(pneu(data_root, image_size=32, channels=3), "val")
    image = ds[0]["image"]
    assert image.shape == (3, 32, 32) and ds.in_channels == 3
    torch.testing.assert_close(image[0], image[2])
    assert read_source(pneu(data_root, image_size=32, channels=3)) is ds.source  # decoded once


def test_size_lookup_and_explicit_size(tmp_path):
    write_npz(tmp_path / "organamnist" / "organamnist_64.npz", size=64)
    write_npz(tmp_path / "organamnist.npz", size=28)
    assert read_source(DataConfig(dataset="medmnist:organamnist", root=str(tmp_path))).images.shape[-1] == 28
    src = read_source(DataConfig(dataset="medmnist:organamnist", root=str(tmp_path), image_size=64))
    assert src.images.shape == (12, 1, 64, 64) and src.files[0].name == "organamnist_64.npz"
    src = read_source(DataConfig(dataset="medmnist:organamnist@64", root=str(tmp_path), image_size=48))
    assert src.images.shape == (12, 1, 48, 48) and src.files[0].name == "organamnist_64.npz"
    assert src.task == "multiclass" and len(src.class_names) == 11  # organamnist has 11 classes


def test_chestmnist_shaped_npz_is_multilabel(tmp_path):
    write_npz(tmp_path / "chestmnist" / "chestmnist_28.npz", n=(8, 4, 4), k=14)
    cfg = DataConfig(dataset="medmnist:chestmnist", root=str(tmp_path))
    ds = build_dataset(cfg, "train")
    assert ds.task == "multilabel" and ds.num_classes == 14 and ds.class_names[1] == "cardiomegaly"
    label = ds[0]["label"]
    assert label.shape == (14,) and label.dtype == torch.float32 and set(label.unique().tolist()) <= {0.0, 1.0}


def test_rgb_medmnist_to_grey(tmp_path):
    write_npz(tmp_path / "pathmnist_28.npz", rgb=True)
    src = read_source(DataConfig(dataset="medmnist:pathmnist", root=str(tmp_path)))
    raw = np.load(tmp_path / "pathmnist_28.npz")["train_images"][0].astype(np.float32) / 255
    np.testing.assert_allclose(src.images[0, 0], raw @ np.array([0.299, 0.587, 0.114]), atol=1e-5)


def test_missing_file_message_names_paths_and_fix(tmp_path):
    with pytest.raises(DataError) as e:
        read_source(DataConfig(dataset="medmnist:bloodmnist@64", root=str(tmp_path)))
    msg = str(e.value)
    assert str(tmp_path / "bloodmnist" / "bloodmnist_64.npz") in msg and "bloodmnist_64.npz" in msg
    assert "MEDPRETRAIN_DATA" in msg and "data.download=true" in msg and "\n" not in msg


def test_download_without_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(DataError, match="optional 'medmnist' package"):
        read_source(DataConfig(dataset="medmnist:dermamnist", root=str(tmp_path), download=True))


@pytest.mark.parametrize("overrides, reason", [
    ({"train_images": np.zeros((6, 28), np.uint8)}, "train_images has shape"),
    ({"val_labels": np.zeros((2, 1), np.uint8)}, "val_labels has shape"),
    ({"test_images": np.zeros((3, 28, 28), np.float32)}, "dtype float32"),
])
def test_wrong_shaped_npz(tmp_path, overrides, reason):
    path = write_npz(tmp_path / "bad" / "breastmnist_28.npz", **overrides)
    with pytest.raises(DataError, match=reason) as e:
        read_source(DataConfig(dataset="medmnist:breastmnist", root=str(tmp_path / "bad")))
    assert str(path) in str(e.value)


def test_missing_keys_and_corrupt_npz(tmp_path):
    np.savez(tmp_path / "retinamnist_28.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"retinamnist_28.npz: missing key\(s\) train_labels, val_images"):
        read_source(DataConfig(dataset="medmnist:retinamnist", root=str(tmp_path)))
    (tmp_path / "octmnist_28.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="octmnist_28.npz: not a readable .npz"):
        read_source(DataConfig(dataset="medmnist:octmnist", root=str(tmp_path), skip_bad=True))


def test_bad_spec_and_split():
    with pytest.raises(DataError, match="unknown dataset spec"):
        read_source(DataConfig(dataset="imagenet:train"))
    with pytest.raises(DataError, match="size must be one of"):
        read_source(DataConfig(dataset="medmnist:pathmnist@100"))
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(DataConfig(), "training")
