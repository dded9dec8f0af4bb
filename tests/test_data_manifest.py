"""Manifests (``manifest:<file>``, ``folder:<file.csv>``) of DICOM, NIfTI and image files: labels, multi-label
columns, patients, official splits, configurable columns and one-line row errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import require_module
from PIL import Image

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import DataError, build_dataset, clear_source_cache, data_stamp, read_source
from medpretrain.data.dataset import split_indices
from medpretrain.data.dicom import dicom_patient_key
from medpretrain.data.privacy import salted_key

require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Real pydicom-data files: (file, label, patient cell). Empty cells fall back to the file's own PatientID key.
# Patients: ID1 (4 files), 11-05-25-142825 (2; 3 samples), CQ500-CT-310 (2), 99000 (2; 6 frames), 13US1 (2),
# and single files of VLUT_nn, MLUT_nn, 021234567, 8NM1.
DICOM_ROWS = [
    ("SC_rgb.dcm", "normal", "ID1"), ("SC_rgb_expb.dcm", "normal", ""), ("SC_rgb_16bit.dcm", "normal", "ID1"),
    ("SC_ybr_full_uncompressed.dcm", "normal", "ID1"),
    ("OBXXXX1A_rle.dcm", "abnormal", "11-05-25-142825"), ("OBXXXX1A_rle_2frame.dcm", "abnormal", ""),
    ("693_UNCI.dcm", "abnormal", "CQ500-CT-310"), ("693_UNCR.dcm", "abnormal", "CQ500-CT-310"),
    ("liver.dcm", "normal", "99000"), ("liver_expb.dcm", "normal", "99000"),
    ("US1_UNCI.dcm", "abnormal", "13US1"), ("US1_UNCR.dcm", "abnormal", ""),
    ("vlut_04.dcm", "normal", "VLUT_nn"), ("mlut_18.dcm", "abnormal", "MLUT_nn"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "normal", "021234567"), ("JPEG2000_UNC.dcm", "abnormal", "8NM1"),
]


def grey(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def png(path: Path, seed: int = 0, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey(*size, seed=seed)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(cfg: DataConfig) -> str:
    clear_source_cache()
    with pytest.raises(DataError) as e:
        read_source(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def dicom_manifest(tmp_path_factory) -> Path:
    """The real files copied under ``dcm/`` beside ``labels.csv`` (path, label, patient)."""
    root = tmp_path_factory.mktemp("rsna_like")
    (root / "dcm").mkdir()
    lines = ["image_path,label,patient"]
    for name, label, patient in DICOM_ROWS:
        shutil.copy(get_testdata_file(name), root / "dcm" / name)
        lines.append(f"dcm/{name},{label},{patient}")
    return write(root / "labels.csv", "\n".join(lines) + "\n")


def test_dicom_manifest_labels_patients_and_salted_keys(dicom_manifest):
    cfg = DataConfig(dataset=f"manifest:{dicom_manifest}", image_size=32, val_fraction=0.2, test_fraction=0.2)
    src = read_source(cfg)
    frames = {"OBXXXX1A_rle_2frame.dcm": 2, "liver.dcm": 3, "liver_expb.dcm": 3}
    assert len(src) == sum(frames.get(n, 1) for n, _, _ in DICOM_ROWS) == 21
    assert src.task == "binary" and src.class_names == ["abnormal", "normal"]
    assert src.images.shape == (21, 1, 32, 32) and src.images.dtype == np.float32
    expected = [int(label == "normal") for n, label, _ in DICOM_ROWS for _ in range(frames.get(n, 1))]
    assert src.labels.tolist() == expected
    assert src.names[5:7] == ["OBXXXX1A_rle_2frame.dcm#0", "OBXXXX1A_rle_2frame.dcm#1"]
    # A patient cell is kept only as the salted key a DICOM PatientID gets; an empty cell falls back to it.
    by_name = dict(zip(src.names, src.groups, strict=True))
    key = dicom_patient_key(pydicom.dcmread(get_testdata_file("SC_rgb.dcm"), stop_before_pixels=True))
    assert key == salted_key("ID1") == by_name["SC_rgb.dcm"] == by_name["SC_rgb_expb.dcm"]
    assert by_name["OBXXXX1A_rle.dcm"] == by_name["OBXXXX1A_rle_2frame.dcm#1"] == salted_key("11-05-25-142825")
    assert len(set(src.groups)) == 9
    for patient in {p for _, _, p in DICOM_ROWS if p}:
        assert all(patient not in text for text in [*src.names, *src.groups, *src.paths])
    # Grouped by patient: no patient on two sides, whatever the seed.
    for seed in range(5):
        parts = split_indices(src, DataConfig(**{**cfg.__dict__, "split_seed": seed}))
        sides = [set(src.groups[parts[s]]) for s in ("train", "val", "test")]
        assert all(sides) and not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert sum(len(parts[s]) for s in parts) == 21
    # The same file read by dicom: gives the same pixels.
    one = read_source(DataConfig(dataset=f"dicom:{dicom_manifest.parent / 'dcm' / 'liver.dcm'}", image_size=32))
    np.testing.assert_array_equal(src.images[src.names.index("liver.dcm#0"):][:3], one.images)
    clear_source_cache()


def test_dicom_manifest_trains_and_splits_by_patient(dicom_manifest, tmp_path):
    from medpretrain.finetune import main_in_process

    out = tmp_path / "run"
    code = main_in_process([
        "--config", str(ROOT / "configs/finetune.yaml"), f"data.dataset=manifest:{dicom_manifest}",
        "data.image_size=32", "data.val_fraction=0.2", "data.test_fraction=0.2", "backbone.arch=cbr_tiny",
        "optim.steps=4", "optim.eval_every=2", "optim.batch_size=8", "optim.eval_batch_size=64", "n_bootstrap=10",
        f"output_dir={out}",
    ])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["label_task"] == "binary"
    assert res["data"]["class_names"] == ["abnormal", "normal"]
    split = res["data"]["split"]
    assert split["method"] == "grouped" and split["groups"] == 9 and split["patient_keys"] is True
    sizes = split["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 21 and res["data"]["test_size"] == sizes["test"]
    cfg = DataConfig(dataset=f"manifest:{dicom_manifest}", image_size=32, val_fraction=0.2, test_fraction=0.2)
    parts = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in parts.items()} == sizes  # the run's split is the library's
    sides = [set(p.source.groups[p.indices]) for p in parts.values()]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    clear_source_cache()


def test_multi_label_columns_give_float_vectors(tmp_path):
    findings = ["Atelectasis", "Effusion", "Nodule"]
    table = [("a.png", "1,0,1"), ("b.png", "0,0,0"), ("c.png", "0.0,1.0,0"), ("d.png", "true,false,TRUE"),
             ("e.png", "0,1,1")]
    for i, (name, _) in enumerate(table):
        png(tmp_path / name, seed=i)
    write(tmp_path / "m.csv", "image_path,Atelectasis,Effusion,Nodule,other\n" +
          "".join(f"{n},{v},x\n" for n, v in table))
    cfg = DataConfig(dataset=f"manifest:{tmp_path / 'm.csv'}", image_size=8, label_columns=findings)
    src = read_source(cfg)
    assert src.task == "multilabel" and src.class_names == findings
    assert src.labels.dtype == np.float32
    np.testing.assert_array_equal(src.labels, [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]])
    ds = build_dataset(DataConfig(**{**cfg.__dict__, "val_fraction": 0.0, "test_fraction": 0.2}), "train")
    sample = ds[0]
    assert sample["label"].dtype == torch.float32 and sample["label"].shape == (3,)
    assert ds.num_classes == 3 and ds.task == "multilabel"
    # A value that is not 0 / 1 (CheXpert's -1 "uncertain") and an empty cell name the row and the column.
    write(tmp_path / "bad.csv", "image_path,Atelectasis,Effusion,Nodule\na.png,1,0,1\nb.png,0,-1,0\nc.png,0,,1\n")
    bad = DataConfig(dataset=f"manifest:{tmp_path / 'bad.csv'}", image_size=8, label_columns=findings)
    assert error_of(bad) == f"{tmp_path / 'bad.csv'}: row 3: unknown label '-1' in column 'Effusion' (expected 0 or 1)"
    clear_source_cache()
    src = read_source(DataConfig(**{**bad.__dict__, "skip_bad": True}))
    assert len(src) == 1 and [r for _, r in src.skipped] == [
        "row 3: unknown label '-1' in column 'Effusion' (expected 0 or 1)", "row 4: empty label in column 'Effusion'"]
    missing_col = DataConfig(**{**cfg.__dict__, "label_columns": ["Atelectasis", "Mass"]})
    assert error_of(missing_col).endswith("m.csv: manifest needs an 'Mass' column (data.label_columns; has: "
                                          "image_path, Atelectasis, Effusion, Nodule, other)")
    with pytest.raises(ConfigError, match="data.classes"):
        read_source(DataConfig(**{**cfg.__dict__, "classes": ["a"]}))
    clear_source_cache()


def test_duplicated_path_and_missing_file_name_the_row(tmp_path):
    for i in range(4):
        png(tmp_path / "img" / f"{i}.png", seed=i)
    manifest = write(tmp_path / "m.csv", "image_path,label\nimg/0.png,a\nimg/1.png,b\nimg/2.png,a\n"
                                         "img/../img/1.png,b\nimg/3.png,b\n")
    cfg = DataConfig(dataset=f"manifest:{manifest}", image_size=8)
    assert error_of(cfg) == f"{manifest}: row 5: duplicated path 'img/../img/1.png' (also row 3; one row per file)"
    clear_source_cache()
    src = read_source(DataConfig(**{**cfg.__dict__, "skip_bad": True}))
    assert src.names == ["0.png", "1.png", "2.png", "3.png"] and src.labels.tolist() == [0, 1, 0, 1]
    assert src.skipped == [(str(manifest), "row 5: duplicated path 'img/../img/1.png' (also row 3; one row per file)")]
    gone = write(tmp_path / "gone.csv", "image_path,label\nimg/0.png,a\n\nimg/gone.png,b\nimg/2.png,b\n")
    assert error_of(DataConfig(dataset=f"folder:{gone}")) == (
        f"{gone}: row 4: img/gone.png: cannot read file (no such file)")  # line 4: the blank line counts
    clear_source_cache()
    src = read_source(DataConfig(dataset=f"folder:{gone}", image_size=8, skip_bad=True))
    assert src.names == ["0.png", "2.png"] and len(src.skipped) == 1
    # A file that does not decode names the file and the row; unknown formats too.
    (tmp_path / "img" / "broken.png").write_text("not an image")
    write(tmp_path / "notes.txt", "hello")
    for row, reason in (("img/broken.png", "not a readable image"), ("notes.txt", "unknown file format")):
        m = write(tmp_path / "one.csv", f"image_path,label\nimg/0.png,a\n{row},b\n")
        msg = error_of(DataConfig(dataset=f"manifest:{m}", image_size=8))
        assert msg.startswith(f"{tmp_path / row}: {reason}") and msg.endswith("(row 3 of one.csv)"), msg
    clear_source_cache()


def test_png_nifti_and_dicom_rows_decode_as_their_own_readers(tmp_path):
    rng = np.random.default_rng(3)
    png(tmp_path / "png" / "x.png", seed=1, size=(30, 26))
    vol = rng.random((10, 9, 4)).astype(np.float32) * 1000
    vol[:, :, 0] = 0  # an empty slice, skipped
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "nii" / "sub-07_t1.nii.gz")
    (tmp_path / "dcm").mkdir()
    shutil.copy(get_testdata_file("vlut_04.dcm"), tmp_path / "dcm" / "vlut_04.dcm")
    manifest = write(tmp_path / "mixed.tsv", "image_path\tlabel\n" "png/x.png\tcat\n"
                     "nii/sub-07_t1.nii.gz\tdog\n" "dcm/vlut_04.dcm\tcat\n")
    cfg = DataConfig(dataset=f"manifest:{manifest}", image_size=16, channels=3)
    src = read_source(cfg)
    assert src.names == ["x.png", "sub-07_t1.nii.gz#1", "sub-07_t1.nii.gz#2", "sub-07_t1.nii.gz#3", "vlut_04.dcm"]
    assert src.labels.tolist() == [0, 1, 1, 1, 0] and src.class_names == ["cat", "dog"]
    assert src.paths == ["png/x.png", *["nii/sub-07_t1.nii.gz"] * 3, "dcm/vlut_04.dcm"]
    assert src.thumbs is None  # not every row's reader keeps thumbnails: no near-duplicate grouping
    for spec, rows in (("folder:png", slice(0, 1)), ("nifti:nii", slice(1, 4)), ("dicom:dcm", slice(4, 5))):
        own = read_source(DataConfig(dataset=spec, root=str(tmp_path), image_size=16, channels=3))
        np.testing.assert_array_equal(src.images[rows], np.asarray(own.images))
        if own.groups is not None:  # NIfTI: the BIDS subject; DICOM: the salted PatientID
            assert set(src.groups[rows]) == set(own.groups)
    assert src.groups[1] == "subject-" + salted_key("sub-07")
    assert src.groups[0] == salted_key("row0")  # a plain image without a patient cell: its own row
    clear_source_cache()


def test_split_column_gives_official_splits(tmp_path):
    rows = []
    for i in range(10):
        png(tmp_path / f"{i}.png", seed=i)
        rows.append(f"{i}.png,{i % 2},{['train', 'Train', 'TRAINING', 'valid', 'test'][i % 5]},P{i}")
    manifest = write(tmp_path / "m.csv", "image_path,label,fold,patient\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(dataset=f"manifest:{manifest}", image_size=8, split_column="fold")
    parts = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    assert [p.names for p in parts.values()] == [["0.png", "1.png", "2.png", "5.png", "6.png", "7.png"],
                                                 ["3.png", "8.png"], ["4.png", "9.png"]]
    assert parts["train"].split_info["method"] == "official"
    write(tmp_path / "bad.csv", "image_path,label,fold\n0.png,0,train\n1.png,1,holdout\n")
    assert error_of(DataConfig(dataset=f"manifest:{tmp_path / 'bad.csv'}", split_column="fold")) == (
        f"{tmp_path / 'bad.csv'}: row 3: unknown split 'holdout' in column 'fold' (expected train, val or test)")
    write(tmp_path / "notrain.csv", "image_path,label,fold\n0.png,0,val\n1.png,1,test\n")
    assert "no readable row of the 'train' split" in error_of(
        DataConfig(dataset=f"manifest:{tmp_path / 'notrain.csv'}", split_column="fold", image_size=8))
    assert "manifest needs an 'split' column (data.split_column" in error_of(
        DataConfig(dataset=f"manifest:{manifest}", split_column="split"))
    clear_source_cache()


def test_configurable_columns_classes_and_unknown_labels(tmp_path):
    for i in range(4):
        png(tmp_path / f"{i}.png", seed=i)
    manifest = write(tmp_path / "m.csv", "file,finding,subject\n0.png,mass,S1\n1.png,normal,S1\n2.png,calc,S2\n"
                                         "3.png,normal,S3\n")
    cols = {"path_column": "file", "label_column": "finding", "patient_column": "subject"}
    cfg = DataConfig(dataset=f"manifest:{manifest}", image_size=8, classes=["normal", "mass", "calc"], **cols)
    src = read_source(cfg)
    assert src.class_names == ["normal", "mass", "calc"] and src.labels.tolist() == [1, 0, 2, 0]
    assert src.task == "multiclass" and src.groups[0] == src.groups[1] == salted_key("S1") != src.groups[2]
    assert error_of(DataConfig(**{**cfg.__dict__, "classes": ["normal", "mass"]})) == (
        f"{manifest}: row 4: unknown label 'calc' in column 'finding' (data.classes: normal, mass)")
    assert error_of(DataConfig(**{**cfg.__dict__, "patient_column": "patient_id"})).endswith(
        "manifest needs an 'patient_id' column (data.patient_column; has: file, finding, subject)")
    # The defaults stay optional: without a label / patient column a manifest is unlabeled and ungrouped.
    clear_source_cache()
    plain = read_source(DataConfig(dataset=f"manifest:{manifest}", image_size=8, path_column="file"))
    assert plain.task == "unlabeled" and plain.labels is None and plain.groups is None
    clear_source_cache()


def test_parquet_manifest_reads_as_the_same_table_in_csv(tmp_path):
    """A Parquet table gives the very source its CSV gives (labels, groups, pixels, official splits), an
    integer label column with a null (a float column, as pandas writes it) keeps integer labels, and its
    errors name the row the CSV would (first data row: 2)."""
    pa = require_module("pyarrow", "bash scripts/setup.sh installs the dev extra, which has pyarrow")
    pq = require_module("pyarrow.parquet", "bash scripts/setup.sh installs the dev extra, which has pyarrow")

    for i in range(6):
        png(tmp_path / f"{i}.png", seed=i)
    files = [f"{i}.png" for i in range(6)]
    labels, subjects = [1, 0, 1, 0, 1, 0], ["S1", "S1", "S2", "S3", "S4", "S5"]
    splits = ["train", "train", "train", "val", "test", "train"]
    csv_text = "image_path,label,patient,split\n" + "".join(
        f"{f},{y},{p},{s}\n" for f, y, p, s in zip(files, labels, subjects, splits, strict=True))
    pq.write_table(pa.table({"image_path": files, "label": labels, "patient": subjects, "split": splits}),
                   tmp_path / "m.parquet")
    cols = {"image_size": 8, "split_column": "split"}
    from_csv = read_source(DataConfig(dataset=f"manifest:{write(tmp_path / 'm.csv', csv_text)}", **cols))
    clear_source_cache()
    from_pq = read_source(DataConfig(dataset=f"manifest:{tmp_path / 'm.parquet'}", **cols))
    assert from_pq.labels.tolist() == from_csv.labels.tolist() == labels
    assert list(from_pq.groups) == list(from_csv.groups) and from_pq.groups[0] == salted_key("S1")
    assert np.array_equal(np.asarray(from_pq.images), np.asarray(from_csv.images))
    assert from_pq.class_names == from_csv.class_names and from_pq.task == "binary"
    clear_source_cache()
    # An integer column holding a null is a float column in Parquet: 1.0 reads as 1, the null as empty.
    pq.write_table(pa.table({"image_path": files[:3], "label": pa.array([1.0, None, 0.0])}), tmp_path / "n.parquet")
    assert error_of(DataConfig(dataset=f"manifest:{tmp_path / 'n.parquet'}", image_size=8)) == (
        f"{tmp_path / 'n.parquet'}: row 3: empty label")
    no_null = read_source(DataConfig(dataset=f"manifest:{tmp_path / 'n.parquet'}", image_size=8, skip_bad=True))
    assert no_null.labels.tolist() == [1, 0] and no_null.class_names == ["0", "1"]
    clear_source_cache()
    write(tmp_path / "bad.parquet", "not parquet\n")
    assert error_of(DataConfig(dataset=f"manifest:{tmp_path / 'bad.parquet'}")).startswith(
        f"{tmp_path / 'bad.parquet'}: cannot read Parquet manifest (")
    clear_source_cache()


def test_data_stamp_follows_the_files_a_manifest_names(tmp_path):
    png(tmp_path / "img" / "0.png", seed=0)
    png(tmp_path / "img" / "1.png", seed=1)
    manifest = write(tmp_path / "lists" / "m.csv", f"image_path,label\n../img/0.png,a\n{tmp_path / 'img' / '1.png'},b\n")
    cfg = DataConfig(dataset="manifest:lists/m.csv", root=str(tmp_path))
    first = data_stamp(cfg)
    assert data_stamp(cfg) == first and data_stamp(DataConfig(dataset=f"folder:{manifest}", root=str(tmp_path))) != first
    png(tmp_path / "img" / "1.png", seed=5, size=(21, 24))  # the manifest itself is unchanged
    assert data_stamp(cfg) != first


def test_validation_carved_from_an_official_train_split_keeps_patients_whole() -> None:
    """A split column with train and test rows only: validation is carved from train by whole patients, so no
    patient is in both train and val (found by the manifest work; splits.make_splits)."""
    import numpy as np

    from medpretrain.data import make_splits

    n = 120
    groups = np.repeat(np.arange(30), 4)  # 30 patients, 4 images each
    labels = np.repeat(np.arange(30) % 2, 4)
    official = {"train": np.arange(0, 100), "test": np.arange(100, n)}
    for seed in range(5):
        s = make_splits(labels, n, groups=groups, official=official, val_fraction=0.2, seed=seed)
        assert set(groups[s["train"]]).isdisjoint(groups[s["val"]])
        assert np.array_equal(s["test"], official["test"])
        assert sorted(np.concatenate([s["train"], s["val"]]).tolist()) == list(range(100))
        assert 12 <= len(s["val"]) <= 28 and len(set(labels[s["val"]])) == 2  # about 20%, both classes
