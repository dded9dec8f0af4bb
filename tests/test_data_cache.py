"""The on-disk image cache (``data.cache``): pixel-exact round trips against the in-memory path (PNG uint8,
real 16-bit DICOM, NIfTI), resuming an interrupted build, keys, skipped files, privacy, and a fine-tuning run
that reads its images from the memory maps."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DICOM_FILES, dicom_folder, png_folder, require_module
from PIL import Image

from medpretrain.config import ConfigError, DataConfig, config_hash, hash_view, load_config
from medpretrain.data import DataError, build_dataset, cache, read_source
from medpretrain.data.cache import CachedImages, build_cache, dequantise, quantise

require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("small_cache_chunks")


def cached(cfg: DataConfig, cache_dir: Path, **kw) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, "cache": True, "cache_dir": str(cache_dir), "cache_workers": 1, **kw})


def assert_same_source(mem, disk, dtype) -> None:
    """``disk`` is ``mem`` with its images quantised to ``dtype`` and memory-mapped."""
    assert isinstance(disk.images, CachedImages) and not isinstance(mem.images, CachedImages)
    assert disk.images.shape == np.asarray(mem.images).shape
    maps = [m for m in disk.images.arrays() if m is not None]
    assert maps and all(isinstance(m, np.memmap) and m.dtype == dtype for m in maps)
    expected = dequantise(quantise(np.asarray(mem.images), dtype))
    got = np.stack(list(disk.images))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - mem.images).max() <= 0.5 / np.iinfo(dtype).max + 1e-7
    assert np.abs(got - mem.images).max() > 0  # quantised, not a copy of the float32 values
    assert disk.names == mem.names and disk.task == mem.task and disk.class_names == mem.class_names
    assert disk.files == mem.files and disk.paths == mem.paths and disk.skipped == mem.skipped
    for a, b in ((disk.labels, mem.labels), (disk.groups, mem.groups), (disk.thumbs, mem.thumbs)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_quantisation_is_round_to_nearest():
    x = np.array([0.0, 0.5 / 255 - 1e-6, 0.5 / 255 + 1e-6, 1 / 3, 1.0, 1.2, -0.1])
    assert quantise(x, np.uint8).tolist() == [0, 0, 1, 85, 255, 255, 0]
    assert quantise(np.array([1 / 3]), np.uint16).tolist() == [21845]
    np.testing.assert_allclose(dequantise(np.array([0, 85, 255], np.uint8)), [0, 1 / 3, 1], atol=1e-7)


def test_png_folder_round_trips_as_uint8_memmaps(tmp_path):
    base = DataConfig(dataset=f"folder:{png_folder(tmp_path / 'png')}", image_size=16)
    mem = read_source(base)
    disk = read_source(cached(base, tmp_path / "cache"))
    assert_same_source(mem, disk, np.uint8)
    assert len(disk.images.arrays()) == 4  # 10 files in chunks of 3
    # A MedicalDataset item is the dequantised, normalised cached image.
    ds = build_dataset(cached(base, tmp_path / "cache"), "test")
    j = int(ds.indices[0])
    np.testing.assert_array_equal(ds[0]["image"].numpy(), (disk.images[j] - 0.5) / 0.5)


def test_16_bit_png_is_cached_as_uint16(tmp_path):
    folder = tmp_path / "png16"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 65536, (18, 18), dtype=np.uint16)).save(folder / f"{i}.png")
    base = DataConfig(dataset=f"folder:{folder}", image_size=12)
    assert_same_source(read_source(base), read_source(cached(base, tmp_path / "cache")), np.uint16)


def test_real_dicom_round_trips_as_uint16_without_identifiers(tmp_path):
    base = DataConfig(dataset=f"dicom:{dicom_folder(tmp_path / 'dcm')}", image_size=24)
    mem = read_source(base)
    assert len(mem) == 13 and mem.names[2:5] == ["MR_small_bigendian.dcm", "emri_small.dcm#0", "emri_small.dcm#1"]
    disk = read_source(cached(base, tmp_path / "cache"))
    assert_same_source(mem, disk, np.uint16)
    # Pixels, salted keys and frame suffixes only: no patient name / id, no file name, no path.
    secrets = {str(tmp_path)}
    for names in DICOM_FILES.values():
        for name in names:
            ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
            secrets |= {str(ds.get("PatientName", "")), str(ds.get("PatientID", "")), name}
    secrets.discard("")
    written = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert any(f.suffix == ".bin" for f in written)
    for f in written:
        blob = f.read_bytes()
        assert not [s for s in secrets if s.encode() in blob], f


def test_nifti_slices_round_trip_as_uint16(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("sub-01", "sub-02"):
        path = tmp_path / "nii" / sub / "anat.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.normal(100, 30, (20, 24, 5)).astype(np.float32), np.eye(4)), path)
    base = DataConfig(dataset=f"nifti:{tmp_path / 'nii'}", image_size=16)
    mem = read_source(base)
    assert len(mem) == 10 and len(set(mem.groups)) == 2
    assert_same_source(mem, read_source(cached(base, tmp_path / "cache")), np.uint16)


def test_manifest_of_mixed_formats_round_trips(tmp_path):
    png_folder(tmp_path / "data", n=2)
    dicom_folder(tmp_path / "data" / "dcm")
    rows = ["image_path,label", "benign/benign_0.png,a", "dcm/ct/CT_small.dcm,b", "malignant/malignant_1.png,a",
            "dcm/mr/emri_small.dcm,b"]
    (tmp_path / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
    base = DataConfig(dataset=f"manifest:{tmp_path / 'data' / 'labels.csv'}", image_size=16)
    mem = read_source(base)
    disk = read_source(cached(base, tmp_path / "cache"))
    assert len(disk) == 13 and disk.thumbs is None  # DICOM rows keep no thumbnails
    # Chunk 0 (two PNGs, one DICOM) is uint16; chunk 1 (10 frames) too: exact against the uint16 quantisation.
    np.testing.assert_array_equal(np.stack(list(disk.images)), dequantise(quantise(mem.images, np.uint16)))
    assert disk.names == mem.names and disk.labels.tolist() == mem.labels.tolist()
    np.testing.assert_array_equal(disk.groups, mem.groups)


def test_interrupted_build_resumes_and_gives_identical_arrays(tmp_path, monkeypatch):
    base = DataConfig(dataset=f"folder:{png_folder(tmp_path / 'png', n=7)}", image_size=16)  # 14 files, 5 chunks
    cfg = cached(base, tmp_path / "cache")

    class Killed(Exception):
        pass

    def kill_after_two(k: int, seen: list[int] = []) -> None:  # noqa: B006 - the count across calls
        seen.append(k)
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        build_cache(cfg, on_chunk=kill_after_two)
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())  # beside file_digests.json
    assert len(list(folder.glob("chunks/*.json"))) == 2 and not (folder / "index.json").exists()
    resumed = build_cache(cfg)
    assert (resumed.chunks, resumed.built, resumed.files, resumed.samples) == (5, 3, 14, 14)
    assert build_cache(cfg).built == 0  # finished: nothing to do
    # A lost chunk marker (a kill between writing pixels and the marker) rebuilds that chunk only.
    (folder / "chunks" / "000002.json").unlink()
    (folder / "index.json").unlink()
    assert build_cache(cfg).built == 1
    # The same arrays as one uninterrupted build, in two worker processes.
    whole = build_cache(cached(base, tmp_path / "cache2", cache_workers=2))
    assert whole.built == 5 and whole.folder.name == folder.name
    for k in range(5):
        a, b = (json.loads((f / "chunks" / f"{k:06d}.json").read_text()) for f in (folder, whole.folder))
        assert a == b
        assert (folder / "chunks" / f"{k:06d}.bin").read_bytes() == (whole.folder / "chunks" / f"{k:06d}.bin").read_bytes()
    assert_same_source(read_source(base), read_source(cfg), np.uint8)


def test_a_changed_pixel_option_builds_a_new_cache(tmp_path):
    base = DataConfig(dataset=f"folder:{png_folder(tmp_path / 'png', n=2)}", image_size=16)
    first = build_cache(cached(base, tmp_path / "cache"))
    assert first.built == 2 and build_cache(cached(base, tmp_path / "cache", cache_workers=3)).built == 0
    other = build_cache(cached(base, tmp_path / "cache", image_size=12))
    assert other.built == 2 and other.folder != first.folder
    assert read_source(cached(base, tmp_path / "cache", image_size=12)).images.shape == (4, 1, 12, 12)
    rgb = build_cache(cached(base, tmp_path / "cache", channels=3))
    assert rgb.built == 2 and rgb.folder not in (first.folder, other.folder)
    # A changed file (size / mtime, so the data stamp) too.
    f = next((tmp_path / "png" / "benign").iterdir())
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(f)
    assert build_cache(cached(base, tmp_path / "cache")).folder != first.folder


def test_unreadable_files_fail_or_skip_as_in_memory(tmp_path):
    folder = png_folder(tmp_path / "png", n=2)
    (folder / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = DataConfig(dataset=f"folder:{folder}", image_size=16)
    with pytest.raises(DataError) as mem_err:
        read_source(base)
    with pytest.raises(DataError) as disk_err:
        read_source(cached(base, tmp_path / "cache"))
    assert str(disk_err.value) == str(mem_err.value) and "broken.png" in str(disk_err.value)
    skip = DataConfig(**{**base.__dict__, "skip_bad": True})
    mem = read_source(skip)
    disk = read_source(cached(skip, tmp_path / "cache"))
    assert len(disk) == 4 and disk.skipped == mem.skipped and len(disk.skipped) == 1
    assert_same_source(mem, disk, np.uint8)


def test_cache_options_are_hash_neutral_off_and_refused_where_not_cached(tmp_path):
    assert not {"cache", "cache_dir", "cache_workers", "cache_above_mb"} & set(hash_view(DataConfig()))
    assert config_hash(DataConfig(cache=True)) == config_hash(DataConfig())  # execution only: same pixels
    # YAML reads on / off as booleans: the config accepts them so, and auto.
    assert [load_config(DataConfig, [f"cache={v}"]).cache for v in ("on", "off", "true", "auto")] == [
        True, False, True, "auto"]
    with pytest.raises(ConfigError, match="config key 'cache'"):
        load_config(DataConfig, ["cache=sometimes"])
    with pytest.raises(ConfigError, match="medmnist: sources are not cached"):
        read_source(DataConfig(dataset="medmnist:pneumoniamnist", cache=True))
    with pytest.raises(ConfigError, match="cache_workers"):
        read_source(DataConfig(dataset=f"folder:{png_folder(tmp_path / 'png', n=1)}", cache=True, cache_workers=0))
    # auto: in memory below the threshold (2 x 16 x 16 x 4 bytes), cached above it.
    small = DataConfig(dataset=f"folder:{tmp_path / 'png'}", image_size=16, cache="auto", cache_dir=str(tmp_path / "c"))
    assert cache.estimated_mb(small, 2) == 2 * 16 * 16 * 4 / 2**20
    assert not isinstance(read_source(small).images, CachedImages) and not (tmp_path / "c").exists()
    big = DataConfig(**{**small.__dict__, "cache_above_mb": 0})
    assert isinstance(read_source(big).images, CachedImages)


def test_finetune_reads_its_images_from_the_memmap(tmp_path, monkeypatch):
    from medpretrain.finetune import main_in_process

    folder = png_folder(tmp_path / "png", n=8)
    reads: list[int] = []
    original = CachedImages.quantised

    def counting(self, j):
        reads.append(j)
        return original(self, j)

    monkeypatch.setattr(CachedImages, "quantised", counting)
    out = tmp_path / "run"
    code = main_in_process([
        "--config", str(ROOT / "configs/finetune.yaml"), f"data.dataset=folder:{folder}", "data.image_size=16",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "data.cache=on", f"data.cache_dir={tmp_path / 'cache'}",
        "data.cache_workers=1", "data.dedup=none", "backbone.arch=cbr_tiny", "optim.steps=2", "optim.eval_every=2",
        "optim.batch_size=4", "optim.eval_batch_size=16", "n_bootstrap=10", f"output_dir={out}",
    ])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["data"]["class_names"] == ["benign", "malignant"]
    assert len(reads) >= 2 * 4 + res["data"]["test_size"]  # training batches and the test set came from disk
    assert len(list((tmp_path / "cache").glob("*/chunks/*.bin"))) == 6  # 16 files in chunks of 3
