"""Streaming (``data.stream``): pixel-identical to the in-memory path for PNG and real 16-bit DICOM (multi-frame
included), the same names / labels / groups / splits / errors, an index without pixels or identifiers, a file
changed after indexing as a one-line error from a DataLoader worker, and pretraining (DataLoader workers,
``train.cache_on_device=false``) and fine-tuning runs that read their images file by file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import DICOM_FILES, dicom_folder, png_folder, require_module
from torch.utils.data import DataLoader

from medpretrain.config import ConfigError, DataConfig, config_hash, hash_view, load_config
from medpretrain.data import DataError, build_dataset, read_source
from medpretrain.data.cache import FileTask
from medpretrain.data.stream import StreamedImages, StreamReadError, build_stream_index

require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("small_cache_chunks")


def streamed(cfg: DataConfig, cache_dir: Path, **kw) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, "stream": True, "cache_dir": str(cache_dir), "cache_workers": 1, **kw})


def assert_same_source(mem, lazy) -> None:
    """``lazy`` is ``mem`` with every image decoded on access: the same float32 values, names, labels, groups."""
    assert isinstance(lazy.images, StreamedImages) and isinstance(mem.images, np.ndarray)
    assert lazy.images.shape == mem.images.shape
    got = np.stack(list(lazy.images))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, mem.images)  # exact: the same decoder, not a quantised copy
    np.testing.assert_array_equal(lazy.images[[2, 0]], mem.images[[2, 0]])
    assert lazy.names == mem.names and lazy.task == mem.task and lazy.class_names == mem.class_names
    assert lazy.files == mem.files and lazy.paths == mem.paths and lazy.skipped == mem.skipped
    for a, b in ((lazy.labels, mem.labels), (lazy.groups, mem.groups), (lazy.thumbs, mem.thumbs)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_png_folder_streams_the_in_memory_pixels_and_keeps_no_pixels_on_disk(tmp_path):
    base = DataConfig(dataset=f"folder:{png_folder(tmp_path / 'png')}", image_size=16)
    mem = read_source(base)
    lazy = read_source(streamed(base, tmp_path / "cache"))
    assert_same_source(mem, lazy)
    written = sorted(f.name for f in (tmp_path / "cache").rglob("chunks/*"))
    assert written == [f"{k:06d}.{ext}" for k in range(4) for ext in ("json", "thumbs")]  # 10 files, chunks of 3
    # The same splits (near-duplicate thumbnails came from the index) and the same normalised items.
    mem_ds, lazy_ds = build_dataset(base, "test"), build_dataset(streamed(base, tmp_path / "cache"), "test")
    assert lazy_ds.indices.tolist() == mem_ds.indices.tolist() and len(lazy_ds) == 2
    for i in range(len(lazy_ds)):
        a, b = mem_ds[i], lazy_ds[i]
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
    # A second run re-uses the index: nothing is built again.
    again = build_stream_index(streamed(base, tmp_path / "cache"))
    assert (again.built, again.files, again.samples, again.chunks) == (0, 10, 10, 4)


def test_real_16_bit_dicom_streams_exactly_without_identifiers_in_the_index(tmp_path, monkeypatch):
    base = DataConfig(dataset=f"dicom:{dicom_folder(tmp_path / 'dcm')}", image_size=24)
    mem = read_source(base)
    assert len(mem) == 13 and mem.names[2:5] == ["MR_small_bigendian.dcm", "emri_small.dcm#0", "emri_small.dcm#1"]
    lazy = read_source(streamed(base, tmp_path / "cache"))
    assert lazy.images.files.tolist() == [0, 1, 2] + [3] * 10 and lazy.images.frames[3:].tolist() == list(range(10))
    # Reading the ten frames in order decodes the multi-frame file once (the last file is kept).
    calls: list[str] = []
    original = FileTask.call

    def counting(self, cfg):
        calls.append(Path(self.path).name)
        return original(self, cfg)

    monkeypatch.setattr(FileTask, "call", counting)
    assert_same_source(mem, lazy)
    # The whole pass (emri_small.dcm once for its ten frames), then images[[2, 0]] in assert_same_source.
    assert calls == ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "emri_small.dcm",
                     "MR_small_bigendian.dcm", "CT_small.dcm"]
    secrets = {str(tmp_path)}
    for names in DICOM_FILES.values():
        for name in names:
            ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
            secrets |= {str(ds.get("PatientName", "")), str(ds.get("PatientID", "")), name}
    secrets.discard("")
    written = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert written and not [f for f in written if f.suffix == ".bin"]
    for f in written:
        blob = f.read_bytes()
        assert not [s for s in secrets if s.encode() in blob], f


def test_unreadable_files_fail_or_skip_before_streaming_as_in_memory(tmp_path):
    folder = png_folder(tmp_path / "png", n=2)
    (folder / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = DataConfig(dataset=f"folder:{folder}", image_size=16)
    with pytest.raises(DataError) as mem_err:
        read_source(base)
    with pytest.raises(DataError) as lazy_err:
        read_source(streamed(base, tmp_path / "cache"))
    assert str(lazy_err.value) == str(mem_err.value) and "broken.png" in str(lazy_err.value)
    skip = DataConfig(**{**base.__dict__, "skip_bad": True})
    mem, lazy = read_source(skip), read_source(streamed(skip, tmp_path / "cache"))
    assert len(lazy) == 4 and lazy.skipped == mem.skipped and len(lazy.skipped) == 1
    assert_same_source(mem, lazy)


def test_a_file_changed_after_indexing_is_one_line_from_a_dataloader_worker(tmp_path):
    folder = png_folder(tmp_path / "png", n=2)
    cfg = streamed(DataConfig(dataset=f"folder:{folder}", image_size=16), tmp_path / "cache")
    ds = build_dataset(cfg, "all", unlabeled=True)
    victim = folder / ds.source.names[int(ds.indices[0])].split("_")[0] / ds.source.names[int(ds.indices[0])]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated since")
    with pytest.raises(StreamReadError) as here:
        ds[0]
    assert str(here.value) == (f"{victim}: corrupt or truncated image (Truncated File Read) (it decoded when "
                               "data.stream indexed the files; changed since?)")
    with pytest.raises(StreamReadError) as there:
        next(iter(DataLoader(ds, batch_size=2, num_workers=1)))
    assert str(there.value) == str(here.value) and there.value.path == str(victim)
    # A file that decodes to another number of samples than indexed (the indexed count altered here) too.
    ds.source.images.counts[int(ds.source.images.files[int(ds.indices[1])])] = 2
    with pytest.raises(StreamReadError, match=r": decodes to 1 x \(1, 16, 16\), not 2 x \(1, 16, 16\) as when "
                                              r"data.stream indexed the files; changed since\?$"):
        ds[1]


def test_stream_options_are_hash_neutral_off_and_refused_where_they_cannot_work(tmp_path):
    assert "stream" not in hash_view(DataConfig())
    assert config_hash(DataConfig(stream=True)) == config_hash(DataConfig())  # execution only (EXECUTION_ONLY)
    assert load_config(DataConfig, ["stream=on"]).stream is True
    folder = png_folder(tmp_path / "png", n=1)
    with pytest.raises(ConfigError, match=r"^config key 'data.stream': streams files instead of caching them; set "
                                          r"data.cache=off \(got data.cache=True\)$"):
        read_source(DataConfig(dataset=f"folder:{folder}", stream=True, cache=True))
    with pytest.raises(ConfigError, match="medmnist: sources are not streamed"):
        read_source(DataConfig(dataset="medmnist:pneumoniamnist", stream=True))
    with pytest.raises(ConfigError, match="cache_workers"):
        read_source(DataConfig(dataset=f"folder:{folder}", stream=True, cache_workers=0))


def test_pretraining_streams_in_dataloader_workers(tmp_path, monkeypatch):
    from medpretrain.checkpoint import read_meta
    from medpretrain.pretrain import main

    folder = png_folder(tmp_path / "png", n=8)
    log = tmp_path / "decodes.txt"
    original = FileTask.call

    def logged(self, cfg):  # DataLoader workers are forked: they inherit this and append to the same file
        with open(log, "a") as fh:
            fh.write(f"{Path(self.path).name}\n")
        return original(self, cfg)

    monkeypatch.setattr(FileTask, "call", logged)
    main("simclr", [f"data.dataset=folder:{folder}", "data.image_size=16", "data.stream=on",
                    f"data.cache_dir={tmp_path / 'cache'}", "data.cache_workers=1", "data.num_workers=1",
                    "data.dedup=none", "train.cache_on_device=false", "backbone.arch=cbr_tiny", "train.batch_size=4",
                    "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0", "train.knn_every=-1",
                    f"out_dir={tmp_path / 'runs'}", "run_name=stream"])
    meta = read_meta(tmp_path / "runs" / "stream" / "backbone.safetensors")
    assert (meta.steps, meta.image_size) == (2, 16)
    decoded = log.read_text().splitlines()
    # The index pass decodes each of the 16 files once; then ds[0] (the image size) and >= 2 batches of 4.
    assert len(decoded) >= 16 + 1 + 2 * 4
    assert sorted(set(decoded[:16])) == sorted(p.name for p in folder.rglob("*.png"))


def test_finetune_streams_its_images(tmp_path, monkeypatch):
    from medpretrain.finetune import main_in_process

    folder = png_folder(tmp_path / "png", n=8)
    reads: list[int] = []
    original = StreamedImages._decoded

    def counting(self, i):
        reads.append(i)
        return original(self, i)

    monkeypatch.setattr(StreamedImages, "_decoded", counting)
    out = tmp_path / "run"
    code = main_in_process([
        "--config", str(ROOT / "configs/finetune.yaml"), f"data.dataset=folder:{folder}", "data.image_size=16",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "data.stream=on", f"data.cache_dir={tmp_path / 'cache'}",
        "data.cache_workers=1", "data.dedup=none", "backbone.arch=cbr_tiny", "optim.steps=2", "optim.eval_every=2",
        "optim.batch_size=4", "optim.eval_batch_size=16", "n_bootstrap=10", f"output_dir={out}",
    ])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["data"]["class_names"] == ["benign", "malignant"]
    assert len(reads) >= 2 * 4 + res["data"]["test_size"]  # training batches and the test set decoded on access
    assert not list((tmp_path / "cache").glob("*/chunks/*.bin")) and len(list((tmp_path / "cache").glob("*/chunks/*.json"))) == 6


def test_stacking_a_streamed_split_on_the_device_is_warned_about(tmp_path, caplog):
    from medpretrain.data.loader import image_loader

    folder = png_folder(tmp_path / "png", n=2)
    ds = build_dataset(streamed(DataConfig(dataset=f"folder:{folder}", image_size=16), tmp_path / "cache"), "all",
                       unlabeled=True, normalize=False)
    with caplog.at_level("WARNING", logger="medpretrain.data.loader"):
        loader, _, to_images = image_loader(ds, 2, True, torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == [
        f"folder:{folder}: train.cache_on_device stacks all {len(ds)} images of the split into one float32 tensor on "
        f"cpu (0.0 GB); set train.cache_on_device=false to read them in DataLoader workers"]
    assert torch.equal(to_images(torch.tensor([1])), ds[1]["image"][None])
