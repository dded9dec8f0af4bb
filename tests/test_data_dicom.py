"""DICOM reader: every pydicom-data file, synthetic files checked numerically, errors and privacy."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from conftest import require_module
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import dicom
from medpretrain.data.dicom import (
    apply_window,
    dicom_patient_key,
    load_dicom,
    parse_window,
    read_dicom_source,
)
from medpretrain.data.errors import DataError, SkipLog

# The real-file tests need pydicom-data (a dev dependency): missing, they fail with the reason, never skip.
require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")

STORE_FILES = sorted(Path(f) for f in get_testdata_files() if "data_store" in Path(f).parts)
BROKEN = {
    "OT-PAL-8-face.dcm": ("preamble", "transfer syntax"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": ("truncated", "no pixel data"),
}
PHI_NAME, PHI_ID, PHI_PLACE = "Doe^Jane", "PAT-SECRET-4711", "St Elsewhere Hospital"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None,
                patient_id: str | None = PHI_ID, **elements) -> Path:
    """Write a small DICOM Part 10 file with identifying elements; extra ``elements`` are set as given."""
    ds = Dataset()
    ds.SOPClassUID = elements.pop("SOPClassUID", SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PHI_NAME
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = PHI_PLACE
    ds.AccessionNumber = "ACC998877"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    for k, v in elements.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"image_size": 32, **kw})


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


# --------------------------------------------------------------------------------------------
# Every pydicom-data file, read once as a folder (module fixture: about 10 s on one core)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store():
    assert len(STORE_FILES) == 68, "pydicom-data should ship 68 files"
    folder = STORE_FILES[0].parent
    assert {p.name for p in folder.iterdir() if p.is_file()} == {p.name for p in STORE_FILES}
    handler, root = ListHandler(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        log = SkipLog(skip_bad=True)
        t0 = time.perf_counter()
        source = read_dicom_source(folder, cfg(), log)
        seconds = time.perf_counter() - t0
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return SimpleNamespace(source=source, log=log, seconds=seconds, logs="\n".join(handler.lines), folder=folder)


def _frames_of(source, name: str) -> list[int]:
    return [i for i, n in enumerate(source.names) if n == name or n.startswith(name + "#")]


def test_every_store_file_loads_or_fails_clearly(store):
    src, skipped = store.source, dict((Path(p).name, r) for p, r in store.log.skipped)
    assert src.skipped == store.log.skipped
    loaded = {Path(f).name for f in src.files}
    for f in STORE_FILES:
        if f.name in skipped:
            assert f.name not in loaded
            reason = skipped[f.name]
            assert len(reason) > 20 and "\n" not in reason, reason
            continue
        assert f.name in loaded, f"{f.name} neither loaded nor reported"
        n_frames = int(pydicom.dcmread(f, stop_before_pixels=True).get("NumberOfFrames") or 1)
        idx = _frames_of(src, f.name)
        assert len(idx) == n_frames, f.name
        if n_frames > 1:
            assert [src.names[i] for i in idx] == [f"{f.name}#{k}" for k in range(n_frames)]
    images = src.images
    assert isinstance(images, np.ndarray) and images.dtype == np.float32
    assert images.shape == (len(src.names), 1, 32, 32)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert len(loaded) + len(skipped) == len(STORE_FILES)
    assert len(loaded) >= 60
    assert set(skipped) == set(BROKEN), skipped  # only the two files broken on purpose
    for name, words in BROKEN.items():
        assert all(w in skipped[name].lower() for w in words), skipped[name]
    assert src.task == "unlabeled" and src.labels is None
    assert store.seconds < 60


def test_no_image_is_blank(store):
    """A loader bug (wrong scaling, byte order) tends to give flat images: every sample has contrast."""
    spread = np.ptp(store.source.images.reshape(len(store.source.names), -1), axis=1)
    assert (spread > 0.05).all(), [store.source.names[i] for i in np.flatnonzero(spread <= 0.05)]


@pytest.mark.parametrize("name, words", BROKEN.items())
def test_known_broken_files_raise(name, words):
    with pytest.raises(DataError) as info:
        load_dicom(get_testdata_file(name), size=8)
    assert info.value.path.endswith(name)
    assert all(w in info.value.reason.lower() for w in words), info.value.reason


def test_compressed_and_big_endian_copies_match_the_uncompressed_file(store):
    src = store.source

    def img(name: str) -> np.ndarray:
        return src.images[_frames_of(src, name)]

    for a, b, tol in [
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm", 1e-6),        # JPEG 2000 lossless
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm", 1e-6),        # MONOCHROME1 CR, 1955 x 1841
        ("US1_UNCR.dcm", "US1_J2KR.dcm", 1e-6),        # RGB vs YBR_RCT
        ("emri_small.dcm", "emri_small_RLE.dcm", 1e-6),
        ("emri_small.dcm", "emri_small_big_endian.dcm", 1e-6),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 1e-6),
        ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 1e-6),     # palette colour
        ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", 1e-6),    # big-endian palette (pydicom 3.0 reads it byte-swapped)
        ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm", 1e-6),
        ("SC_rgb.dcm", "SC_rgb_16bit.dcm", 1e-3),       # same picture at 8 and 16 bits
        ("SC_rgb.dcm", "SC_rgb_32bit.dcm", 1e-3),
        ("MR2_UNCI.dcm", "MR2_J2KI.dcm", 0.02),         # lossy JPEG 2000
    ]:
        np.testing.assert_allclose(img(a), img(b), atol=tol, err_msg=f"{a} vs {b}")


def test_store_identifiers_never_leak(store):
    values: set[str] = set()
    for f in STORE_FILES:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber"):
            v = str(ds.get(kw) or "").strip()
            if len(v) >= 3:
                values.add(v)
    assert {"Lestrade^G", "CompressedSamples^RG1", "ID1", "9RG1"} <= values  # the test looks at real values
    src = store.source
    outputs = "\n".join([*src.names, *map(str, src.groups), *(r for _, r in src.skipped), store.logs])
    # whole-token matches, so that e.g. PatientID "204" does not match inside a UID or a byte count
    leaked = sorted(v for v in values if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", outputs))
    assert not leaked
    assert src.groups is not None and len(src.groups) == len(src.names)
    # same patient, same key; the raw id never appears as a key
    g = {n: src.groups[i] for i, n in enumerate(src.names)}
    assert g["RG1_UNCI.dcm"] == g["RG1_J2KI.dcm"] != g["RG3_UNCI.dcm"]
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    assert g["RG1_UNCI.dcm"] == dicom_patient_key(ds)


# --------------------------------------------------------------------------------------------
# Numbers on synthetic files
# --------------------------------------------------------------------------------------------


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(33, 34), dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 4095
    m2 = write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", bits=12)
    m1 = write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", bits=12)
    expected = (pixels.astype(np.float64) - pixels.min()) / np.ptp(pixels)
    for window in ("auto", "minmax"):
        (x2,), (x1,) = load_dicom(m2, window), load_dicom(m1, window)
        assert x2.shape == (1, 33, 34) and x2.dtype == np.float32
        np.testing.assert_allclose(x2[0], expected, atol=1e-6)
        np.testing.assert_allclose(x1, 1.0 - x2, atol=1e-6)
    (x2,), (x1,) = load_dicom(m2, "2000,1000"), load_dicom(m1, "2000,1000")
    np.testing.assert_allclose(x1, 1.0 - x2, atol=1e-6)
    # resized through read_dicom_source: still exact inverses
    a = read_dicom_source(m2, cfg(image_size=17), SkipLog()).images
    b = read_dicom_source(m1, cfg(image_size=17), SkipLog()).images
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-5)


def test_ct_rescale_and_windows(tmp_path):
    stored = np.arange(-300, 1200, dtype=np.int16)[:1496].reshape(34, 44)
    hu = stored.astype(np.float64) * 2.0 - 1024.0
    f = write_dicom(tmp_path / "ct.dcm", stored, bits=16, SOPClassUID=CTImageStorage,
                    RescaleSlope="2", RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400")
    # explicit window: [c - w/2, c + w/2] HU -> [0, 1]
    (x,) = load_dicom(f, "40,400")
    np.testing.assert_allclose(x[0], np.clip((hu + 160.0) / 400.0, 0, 1), atol=1e-6)
    # auto: the header window with the DICOM LINEAR function (PS3.3 C.11.2.1.2.1)
    (x,) = load_dicom(f, "auto")
    np.testing.assert_allclose(x[0], np.clip((hu - 39.5) / 399.0 + 0.5, 0, 1), atol=1e-6)
    # minmax ignores the header window but keeps the rescale (invisible after min-max, so check range)
    (x,) = load_dicom(f, "minmax")
    np.testing.assert_allclose(x[0], (hu - hu.min()) / np.ptp(hu), atol=1e-6)


def test_enhanced_ct_uses_functional_group_rescale_and_window():
    """eCT_Supplemental keeps Rescale and Window only in the shared functional groups."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    pvt, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    frames = load_dicom(path, "auto")
    assert len(frames) == 2
    for k, x in enumerate(frames):
        hu = ds.pixel_array[k].astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        c, w = float(voi.WindowCenter), float(voi.WindowWidth)
        np.testing.assert_allclose(x[0], np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6)
    (x,) = load_dicom(path, "-1000,2000")[:1]
    hu = ds.pixel_array[0].astype(np.float64) - 1024.0
    np.testing.assert_allclose(x[0], np.clip((hu + 2000.0) / 2000.0, 0, 1), atol=1e-6)


def test_window_functions_against_the_standard():
    x = np.array([-1000.0, -160.0, 0.0, 39.5, 40.0, 240.0, 1000.0])
    np.testing.assert_allclose(apply_window(x, 40, 400, "LINEAR_EXACT"), np.clip((x - 40) / 400 + 0.5, 0, 1))
    np.testing.assert_allclose(apply_window(x, 40, 400, "LINEAR"),
                               np.clip((x - 39.5) / 399 + 0.5, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(apply_window(x, 40, 400, "SIGMOID"), 1 / (1 + np.exp(-4 * (x - 40) / 400)),
                               rtol=1e-6)
    assert list(apply_window(np.array([9.0, 10.0]), 10, 1, "LINEAR")) == [0.0, 1.0]


def test_multiframe_samples_and_names(tmp_path):
    frames = np.stack([np.full((9, 11), 10 * k, dtype=np.uint8) for k in range(5)])
    frames[:, 0, 0] = 0
    f = write_dicom(tmp_path / "cine.dcm", frames)
    out = load_dicom(f, "minmax")
    assert len(out) == 5 and all(o.shape == (1, 9, 11) for o in out)
    # min-max over the whole file: frame k is 10k / 40 away from the corner pixel
    assert [round(float(o[0, 5, 5]), 6) for o in out] == [0.0, 0.25, 0.5, 0.75, 1.0]
    src = read_dicom_source(tmp_path, cfg(image_size=16, window="minmax"), SkipLog())
    assert src.names == [f"cine.dcm#{k}" for k in range(5)]
    assert src.images.shape == (5, 1, 16, 16)
    assert len(set(src.groups)) == 1  # frames of one file share a group


def test_rgb_and_palette_to_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(12, 13, 3), dtype=np.uint8)
    f = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", bits=8)
    luma = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0
    (grey,) = load_dicom(f, channels=1)
    np.testing.assert_allclose(grey[0], luma, atol=1e-5)
    (colour,) = load_dicom(f, channels=3)
    np.testing.assert_allclose(colour, np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)
    # palette colour: 8-bit indices into 16-bit tables
    index = rng.integers(0, 256, size=(12, 13), dtype=np.uint8)
    tables = [np.linspace(0, 65535, 256), np.linspace(65535, 0, 256), np.full(256, 32768.0)]
    tables16 = [t.astype("<u2") for t in tables]
    lut = {f"{c}PaletteColorLookupTable{part}": val for c, t in zip(("Red", "Green", "Blue"), tables16, strict=True)
           for part, val in (("Descriptor", [256, 0, 16]), ("Data", t.tobytes()))}
    p = write_dicom(tmp_path / "pal.dcm", index, "PALETTE COLOR", bits=8, **lut)
    (grey,) = load_dicom(p)
    expected = sum(w * t[index] for w, t in zip((0.299, 0.587, 0.114), tables16, strict=True)) / 65535.0
    np.testing.assert_allclose(grey[0], expected, atol=1e-5)
    (grey3,) = load_dicom(p, channels=3)
    np.testing.assert_allclose(grey3[0], tables16[0][index] / 65535.0, atol=1e-6)
    # monochrome with channels=3 repeats the grey channel
    m = write_dicom(tmp_path / "m.dcm", index)
    (x,) = load_dicom(m, channels=3)
    assert x.shape == (3, 12, 13) and np.array_equal(x[0], x[2])


def test_signed_8_to_16_bit(tmp_path):
    for dtype, bits in ((np.uint8, 8), (np.int8, 8), (np.uint16, 10), (np.int16, 16)):
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(2 ** (bits - 1))) if info.min < 0 else 0, min(info.max, 2**bits - 1)
        px = np.linspace(lo, hi, 7 * 9).astype(dtype).reshape(7, 9)
        f = write_dicom(tmp_path / f"{np.dtype(dtype).name}.dcm", px, bits=bits)
        (x,) = load_dicom(f)
        np.testing.assert_allclose(x[0], (px.astype(float) - lo) / (hi - lo), atol=1e-6, err_msg=str(dtype))


def test_file_without_preamble_but_with_meta_loads(tmp_path):
    f = write_dicom(tmp_path / "a.dcm", np.arange(20, dtype=np.uint8).reshape(4, 5))
    raw = tmp_path / "IM0001"  # no extension, no 128-byte preamble
    raw.write_bytes(f.read_bytes()[132:])
    (x,) = load_dicom(raw)
    np.testing.assert_allclose(x[0].ravel(), np.arange(20) / 19, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Patient keys
# --------------------------------------------------------------------------------------------


def test_patient_keys_group_files_and_depend_on_the_salt(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    px = np.arange(64, dtype=np.uint8).reshape(8, 8)
    write_dicom(tmp_path / "a1.dcm", px, patient_id="P-1")
    write_dicom(tmp_path / "a2.dcm", px, patient_id="P-1 ")
    write_dicom(tmp_path / "b.dcm", px, patient_id="P-2")
    write_dicom(tmp_path / "c.dcm", px, patient_id=None)
    src = read_dicom_source(tmp_path, cfg(image_size=8), SkipLog())
    g = dict(zip(src.names, src.groups, strict=True))
    assert g["a1.dcm"] == g["a2.dcm"] != g["b.dcm"]
    assert g["c.dcm"].startswith("file-") and g["c.dcm"] not in (g["a1.dcm"], g["b.dcm"])
    assert len(g["a1.dcm"]) == 16 and "P-1" not in g["a1.dcm"]
    ds = pydicom.dcmread(tmp_path / "a1.dcm", stop_before_pixels=True)
    assert dicom_patient_key(ds, "salt-a") != dicom_patient_key(ds, "salt-b")
    assert dicom_patient_key(ds) == dicom_patient_key(ds, dicom.DEFAULT_SALT) == g["a1.dcm"]
    del ds.PatientID
    assert dicom_patient_key(ds) is None
    monkeypatch.setenv(dicom.SALT_ENV, "site-secret")
    g2 = dict(zip(src.names, read_dicom_source(tmp_path, cfg(image_size=8), SkipLog()).groups, strict=True))
    assert g2["a1.dcm"] == g2["a2.dcm"] != g["a1.dcm"]


# --------------------------------------------------------------------------------------------
# Errors, folders, privacy of errors and logs
# --------------------------------------------------------------------------------------------


def test_bad_files_give_clear_reasons(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", np.zeros((4, 4), np.uint8))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.bin"
    text.write_text("not an image\n" * 20)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(write_dicom(tmp_path / "big.dcm", np.ones((64, 64), np.uint16), bits=12).read_bytes()[:-3000])
    ds = pydicom.dcmread(good)
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix)
    ds = pydicom.dcmread(good)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 12])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg = tmp_path / "mpeg.dcm"
    ds.save_as(mpeg)
    expect = {
        empty: "empty file (0 bytes)",
        text: "not a DICOM file",
        cut: "truncated pixel data: ",
        nopix: "no pixel data in this file (SOP class 'Secondary Capture Image Storage')",
        mpeg: "unsupported transfer syntax 'MPEG2 Main Profile / Main Level'",
    }
    for path, words in expect.items():
        with pytest.raises(DataError) as info:
            load_dicom(path)
        assert words in info.value.reason, (path.name, info.value.reason)
        assert str(info.value).startswith(str(path))


def test_missing_plugin_is_named(monkeypatch):
    monkeypatch.setattr(dicom, "get_decoder", lambda uid: SimpleNamespace(is_available=False,
                                                                         missing_dependencies=[]))
    with pytest.raises(DataError) as info:
        load_dicom(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))
    assert "JPEG-LS Lossless" in info.value.reason and "pylibjpeg-libjpeg" in info.value.reason


def test_folder_skip_bad_labels_and_ignored_files(tmp_path, caplog):
    px = np.arange(36, dtype=np.uint8).reshape(6, 6)
    write_dicom(tmp_path / "normal" / "n1.dcm", px)
    write_dicom(tmp_path / "normal" / "deeper" / "n2", px)  # no extension, nested
    write_dicom(tmp_path / "pneumonia" / "p1.dcm", px)
    (tmp_path / "pneumonia" / "p2.dcm").write_bytes(b"garbage" * 50)
    (tmp_path / "pneumonia" / "report.txt").write_text("ignored")
    (tmp_path / "pneumonia" / ".DS_Store").write_bytes(b"\0" * 10)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("ignored, so docs/ is not a class")
    write_dicom(tmp_path / "stray.dcm", px)
    with pytest.raises(DataError, match="p2.dcm: not a DICOM file"):
        read_dicom_source(tmp_path, cfg(image_size=8), SkipLog())
    log = SkipLog(skip_bad=True)
    with caplog.at_level(logging.INFO):
        src = read_dicom_source(tmp_path, cfg(image_size=8), log)
    assert src.class_names == ["normal", "pneumonia"] and src.task == "binary"
    assert src.names == ["n2", "n1.dcm", "p1.dcm"]
    assert src.labels.tolist() == [0, 0, 1] and src.labels.dtype == np.int64
    assert [Path(p).name for p, _ in log.skipped] == ["p2.dcm"] and src.skipped == log.skipped
    assert "not in a class sub-folder" in caplog.text
    # one sub-folder is not a classification: unlabeled, recursive
    one = tmp_path / "only"
    write_dicom(one / "series1" / "a.dcm", px)
    write_dicom(one / "b.dcm", px)
    src = read_dicom_source(one, cfg(image_size=8), SkipLog())
    assert src.task == "unlabeled" and src.labels is None and sorted(src.names) == ["a.dcm", "b.dcm"]
    with pytest.raises(DataError, match="no DICOM files found"):
        read_dicom_source(tmp_path / "docs", cfg(), SkipLog())
    with pytest.raises(DataError, match="not found"):
        read_dicom_source(tmp_path / "missing", cfg(), SkipLog())


def test_identifiers_stay_out_of_errors_and_logs(tmp_path, monkeypatch, caplog):
    px = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(tmp_path / "ok.dcm", px, bits=12)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(write_dicom(tmp_path / "x" / "full.dcm", np.ones((64, 64), np.uint16)).read_bytes()[:-5000])
    pydicom.config.debug(True)  # pydicom then logs every element it reads, values included
    try:
        with caplog.at_level(logging.DEBUG):
            log = SkipLog(skip_bad=True)
            src = read_dicom_source(tmp_path, cfg(image_size=8), log)
    finally:
        pydicom.config.debug(False)
    assert len(src.names) == 2 and len(log.skipped) == 1
    # an exception text quoting an identifier is scrubbed before it becomes a reason
    def leaky(ds, **kw):
        raise ValueError(f"cannot decode for {ds.PatientName} / {ds.PatientID} at {ds.InstitutionName}")
        yield
    monkeypatch.setattr(dicom, "iter_pixels", leaky)
    with pytest.raises(DataError) as info:
        load_dicom(tmp_path / "ok.dcm")
    assert "<redacted>" in info.value.reason and "ValueError" in info.value.reason
    outputs = "\n".join([caplog.text, *src.names, *src.groups, *(r for _, r in log.skipped), str(info.value)])
    for secret in (PHI_NAME, "Doe", "Jane", PHI_ID, PHI_PLACE, "19700101", "ACC998877"):
        assert secret not in outputs, secret


def test_config_errors():
    assert parse_window("auto") == "auto" and parse_window(" MinMax ") == "minmax"
    assert parse_window("40,400") == (40.0, 400.0) and parse_window("-600,1500") == (-600.0, 1500.0)
    for bad in ("soft", "40", "40,0", "40,-1", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="data.window"):
            parse_window(bad)
    with pytest.raises(ConfigError, match="data.channels"):
        read_dicom_source(Path(os.devnull), cfg(channels=2), SkipLog())
