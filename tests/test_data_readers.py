"""The reader registry: a new format is one module plus one entry, read by the spec parser, the dataset
builder, the data stamp and manifest rows; per-file formats are recognised by content, then suffix."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import require_module
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from medpretrain.config import DataConfig
from medpretrain.data import (
    READERS,
    DataError,
    Decoded,
    Reader,
    Source,
    build_dataset,
    clear_source_cache,
    data_stamp,
    parse_spec,
    read_source,
    reader_for_file,
)
from medpretrain.data.folder import IMAGE_EXTENSIONS
from medpretrain.data.nifti import NIFTI_SUFFIXES

require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")
from pydicom.data import get_testdata_file  # noqa: E402


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str = "P-1") -> Path:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.set_pixel_data(pixels, "MONOCHROME2", pixels.dtype.itemsize * 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def fake_format(calls: list) -> types.SimpleNamespace:
    """A reader module for ``.fake`` files: a text file of ``H W value``, one grey image."""

    def decode_fake_file(path: Path, cfg: DataConfig, rel: str) -> Decoded:
        h, w, v = (int(t) for t in path.read_text().split())
        calls.append(("decode", path.name, rel))
        return Decoded(images=np.full((1, 1, h, w), v / 255, np.float32), names=[path.name])

    def read_fake_source(path: Path, cfg: DataConfig, skips) -> Source:
        files = sorted(path.glob("*.fake"))
        calls.append(("source", path.name, len(files)))
        decoded = [decode_fake_file(f, cfg, f.name) for f in files]
        return Source(images=np.concatenate([d.images for d in decoded]), task="unlabeled",
                      names=[n for d in decoded for n in d.names], files=files)

    def fake_files(spec, cfg: DataConfig) -> list[Path]:
        calls.append(("files", spec.paths[0].name))
        return sorted(spec.paths[0].glob("*.fake"))

    return types.SimpleNamespace(read_fake_source=read_fake_source, decode_fake_file=decode_fake_file,
                                 fake_files=fake_files)


def test_a_new_format_is_one_module_and_one_entry(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "fake_reader_module", fake_format(calls))
    monkeypatch.setitem(READERS, "fake", Reader("fake", "fake_reader_module", "read_fake_source",
                                                decode_file="decode_fake_file", suffixes=(".fake",),
                                                source_files="fake_files"))
    (tmp_path / "scans").mkdir()
    for i, v in enumerate((10, 200, 30, 40, 50)):
        (tmp_path / "scans" / f"s{i}.fake").write_text(f"3 4 {v}")
    spec = parse_spec("FAKE: scans", tmp_path)
    assert (spec.scheme, spec.paths) == ("fake", (tmp_path / "scans",))
    cfg = DataConfig(dataset="fake:scans", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    ds = build_dataset(cfg, "all", unlabeled=True, normalize=False)
    assert calls[0] == ("source", "scans", 5) and len(ds) == 4
    assert {round(float(ds[i]["image"].max()) * 255) for i in range(4)} <= {10, 200, 30, 40, 50}
    stamp = data_stamp(cfg)
    assert ("files", "scans") in calls
    (tmp_path / "scans" / "s0.fake").write_text("3 4 11 ")
    assert data_stamp(cfg) != stamp
    # The same entry makes manifest rows of the format readable: by suffix (no signature).
    (tmp_path / "m.csv").write_text("image_path,label\nscans/s1.fake,a\nscans/s2.fake,b\n")
    src = read_source(DataConfig(dataset="manifest:m.csv", root=str(tmp_path)))
    assert src.labels.tolist() == [0, 1] and src.images.shape == (2, 1, 3, 4)
    assert ("decode", "s1.fake", "scans/s1.fake") in calls
    assert np.allclose(src.images[0], 200 / 255)
    clear_source_cache()


def test_unknown_scheme_lists_the_registry(tmp_path):
    with pytest.raises(DataError) as e:
        parse_spec("pacs:somewhere", tmp_path)
    assert str(e.value) == ("pacs:somewhere: unknown dataset spec; expected one of medmnist:, folder:, manifest:, "
                            "segpairs:, drive:, dicom:, nifti:")
    with pytest.raises(DataError, match="dicom spec needs a path"):
        parse_spec("dicom:", tmp_path)


def test_registry_suffixes_are_the_readers_own():
    assert READERS["folder"].suffixes == IMAGE_EXTENSIONS
    assert READERS["nifti"].suffixes == NIFTI_SUFFIXES
    assert [r.scheme for r in READERS.values() if r.decode_file] == ["folder", "dicom", "nifti"]


def test_files_are_recognised_by_content_then_suffix(tmp_path):
    px = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(px).save(tmp_path / "a.png")
    (tmp_path / "png_named.dat").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(px).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(px).save(tmp_path / "c.tif")
    dcm = write_dicom(tmp_path / "IM0001", px)  # no suffix: the DICM marker
    (tmp_path / "raw").write_bytes(dcm.read_bytes()[132:])  # no preamble: starts with the file meta group
    (tmp_path / "raw_no_meta").write_bytes(dcm.read_bytes()[132 + len(_meta_bytes(dcm)):])  # group 0008 first
    vol = nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4))
    nib.save(vol, tmp_path / "v.nii")
    (tmp_path / "nii_named.bin").write_bytes((tmp_path / "v.nii").read_bytes())
    nib.save(vol, tmp_path / "v.nii.gz")  # gzip: by suffix
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    found = {p.name: (reader_for_file(p).scheme if reader_for_file(p) else None) for p in sorted(tmp_path.iterdir())}
    assert found == {
        "IM0001": "dicom", "a.png": "folder", "b.jpg": "folder", "c.tif": "folder", "empty.png": "folder",
        "nii_named.bin": "nifti", "notes.txt": None, "png_named.dat": "folder", "raw": "dicom",
        "raw_no_meta": "dicom", "v.nii": "nifti", "v.nii.gz": "nifti",
    }
    with pytest.raises(DataError, match="gone.png: cannot read file"):
        reader_for_file(tmp_path / "gone.png")
    # A real DICOM file whose preamble is a TIFF header (PIL would open it as a TIFF): DICM at byte 128 wins.
    dual = Path(get_testdata_file("US1_UNCR.dcm"))
    assert dual.read_bytes()[:4] == b"II*\x00" and reader_for_file(dual).scheme == "dicom"


def _meta_bytes(path: Path) -> bytes:
    """The file meta group of a Part 10 file, as stored after the preamble and marker."""
    ds = pydicom.dcmread(path)
    return path.read_bytes()[132:132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)]


def test_per_file_decoders_match_their_source_readers(tmp_path):
    """The folder, DICOM and NIfTI source readers are loops over the decoders manifest rows use."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(tmp_path / "x.png")
    write_dicom(tmp_path / "d" / "y.dcm", rng.integers(0, 4096, (12, 10)).astype(np.uint16), "PX")
    (tmp_path / "n").mkdir()
    nib.save(nib.Nifti1Image(rng.random((6, 5, 3)).astype(np.float32), np.eye(4)), tmp_path / "n" / "z.nii.gz")
    cfg = DataConfig(image_size=16)
    for spec, file, scheme in (("folder:", tmp_path / "x.png", "folder"), ("dicom:d", tmp_path / "d" / "y.dcm", "dicom"),
                               ("nifti:n", tmp_path / "n" / "z.nii.gz", "nifti")):
        src = read_source(DataConfig(dataset=spec if spec != "folder:" else f"folder:{tmp_path}", root=str(tmp_path),
                                     image_size=16))
        decoded = READERS[scheme].decode(file, cfg, file.name)
        np.testing.assert_array_equal(np.asarray(src.images), decoded.images)
        assert src.names == decoded.names
        if scheme == "folder":
            assert decoded.group is None and np.array_equal(src.thumbs, decoded.thumbs)
        else:
            assert decoded.thumbs is None and set(src.groups) == {decoded.group}
    assert READERS["nifti"].decode(tmp_path / "n" / "z.nii.gz", cfg, "z.nii.gz").names == ["z.nii.gz#0", "z.nii.gz#1",
                                                                                          "z.nii.gz#2"]
    clear_source_cache()
