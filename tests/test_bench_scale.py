"""benchmarks/bench_scale.py: its generated DICOM files decode to the pixels written, its cache of them holds no
identifier (and the search would see one), and its rates and goals are computed from the numbers (no training)."""

from __future__ import annotations

import importlib.util
import sys
from itertools import groupby
from pathlib import Path

import numpy as np
import pydicom

from medpretrain.config import DataConfig
from medpretrain.data import clear_source_cache, read_source
from medpretrain.data.cache import build_cache
from medpretrain.data.dicom import decode_dicom_file
from medpretrain.data.privacy import salted_key

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
bs = importlib.util.module_from_spec(spec)
sys.modules["bench_scale"] = bs
spec.loader.exec_module(bs)


def test_radiographs_are_12_bit_seeded_and_the_lesion_shows():
    a = bs.radiograph(np.random.default_rng(5), 48)
    assert a.dtype == np.uint16 and a.shape == (48, 48) and 0 <= a.min() and a.max() <= 4095
    np.testing.assert_array_equal(a, bs.radiograph(np.random.default_rng(5), 48))
    assert len(np.unique(a)) > 200  # an image, not a constant
    assert not np.array_equal(a, bs.radiograph(np.random.default_rng(5), 48, lesion=True))


def test_generated_files_decode_to_their_pixels_and_leave_no_identifier_in_the_cache(tmp_path):
    who = bs.patients(5, seed=3)
    # Consecutive files of one patient (1-3 each; here 2, 2, 1), every ID and name under its marker.
    runs = [len(list(g)) for _, g in groupby(who)]
    assert runs == [2, 2, 1] and len({w[0] for w in who}) == len({w[1] for w in who}) == 3
    assert all(w[0].startswith(bs.ID_MARKER) and w[1].startswith(bs.NAME_MARKER) for w in who)
    assert {len(list(g)) for _, g in groupby(bs.patients(200, seed=0))} == {1, 2, 3}
    rows = bs.generate_files(str(tmp_path / "study"), list(range(5)), who, seed=3, size=40)
    assert [r["patient"] for r in rows] == [w[0] for w in who]
    for k, row in enumerate(rows):
        path = tmp_path / "study" / row["image_path"]
        rng = np.random.default_rng(np.random.SeedSequence([3, 2, k]))
        lesion = bool(rng.random() < 0.5)
        assert row["label"] == ("abnormal" if lesion else "normal")
        expected = bs.radiograph(rng, 40, lesion)
        ds = pydicom.dcmread(path)
        assert (ds.BitsAllocated, ds.BitsStored, ds.PatientID, str(ds.PatientName)) == (16, 12, *who[k])
        np.testing.assert_array_equal(ds.pixel_array, expected)
        # The reader at the native size: window 2048 / 4096 (linear) maps a stored value v to v / 4095.
        decoded = decode_dicom_file(path, DataConfig(image_size=40), row["image_path"])
        np.testing.assert_allclose(decoded.images[0, 0], expected / 4095, rtol=0, atol=1e-6)
    manifest = bs.write_manifest(tmp_path / "study" / "all.csv", rows)
    cfg = DataConfig(dataset=f"manifest:{manifest}", image_size=16, cache=True, cache_dir=str(tmp_path / "cache"),
                     cache_workers=1)
    info = build_cache(cfg)
    assert (info.files, info.samples) == (5, 5)
    clear_source_cache()
    source = read_source(cfg)
    assert set(source.groups) == {salted_key(w[0]) for w in who}  # grouped by salted patient keys only
    clear_source_cache()
    markers = [bs.ID_MARKER, bs.NAME_MARKER, bs.FILE_MARKER, str(tmp_path)]
    assert bs.identifiers_in(tmp_path / "cache", markers) == {}
    # The search finds what is there, across its read blocks too.
    (tmp_path / "cache" / "planted.bin").write_bytes(b"\0" * (1 << 24) + who[0][1].encode())
    assert bs.identifiers_in(tmp_path / "cache", markers) == {"planted.bin": [bs.NAME_MARKER]}


def test_rate_leaves_the_first_window_out_and_goals_are_computed():
    rows = [{"step": "2", "images_per_s": "4"}, {"step": "4", "images_per_s": "16"}, {"step": "", "images_per_s": ""},
            {"step": "8", "images_per_s": "32"}]
    # batch 8: windows of 16, 16, 32 images taking 4, 1, 1 s; without the first, 48 images in 2 s.
    rate = bs.logged_rate(rows, 8)
    assert (rate["images_per_s"], rate["images"], rate["seconds"], rate["windows"]) == (24.0, 48.0, 2.0, 3)
    res = {"runs": {"cache": {"peak_rss_bytes": 4 * 2**30, "images_per_s": 90.0}, "memory": {"images_per_s": 100.0}},
           "privacy": {"files_with_identifiers": {}}}
    assert [g["met"] for g in bs.goals(res)] == [False, True, True]
    res["runs"]["cache"].update(peak_rss_bytes=4 * 2**30 - 1, images_per_s=89.9)
    res["privacy"]["files_with_identifiers"] = {"chunks/000000.json": [bs.ID_MARKER]}
    assert [(g["value"], g["met"]) for g in bs.goals(res)] == [("4.00 GiB", True), ("89.9%", False), ("1", False)]
