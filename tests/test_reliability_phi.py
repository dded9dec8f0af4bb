"""Reliability: patient data. DICOM identifiers of real ``pydicom-data`` files never reach an output.

Twelve single-frame files of distinct (test) patients are copied into two class folders, read in-process
with logging at DEBUG, then pretrained on (SimCLR) and fine-tuned on (a linear probe from that export),
each for a couple of steps. Every byte of every output file (``.npz`` members unzipped), the captured
stdout / stderr and the log records are searched for each file's PatientName (also with ``^`` as a space),
PatientID, InstitutionName and dates (study, series, acquisition, content, birth).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import require_module
from reliability_record import record

from medpretrain.config import DataConfig
from medpretrain.data import build_dataset, clear_source_cache

require_module("data_store", "pip install pydicom-data (part of the [dev] extra; scripts/setup.sh installs it)")
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILES = {
    "a": ["JPEG-LL.dcm", "MR2_J2KI.dcm", "RG3_J2KI.dcm", "US1_J2KI.dcm", "OBXXXX1A_rle.dcm", "SC_rgb.dcm"],
    "b": ["vlut_04.dcm", "explicit_VR-UN.dcm", "693_J2KR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
          "color-pl.dcm", "bad_sequence.dcm"],
}
ID_ELEMENTS = ["PatientName", "PatientID", "InstitutionName", "PatientBirthDate", "StudyDate", "SeriesDate",
               "AcquisitionDate", "ContentDate", "AccessionNumber", "ReferringPhysicianName"]
MIN_LEN = 5  # shorter values ("ID1", "OB") occur by chance in binary files; each file has a longer one


def identifiers(path: Path) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = set()
    for name in ID_ELEMENTS:
        value = str(ds.get(name, "") or "").strip()
        if name.endswith("Name") and value:
            out.add(value.replace("^", " ").strip())
        out.add(value)
    return {v for v in out if len(v) >= MIN_LEN and v.lower() != "anonymized"}


def leaks(blob: bytes, secrets: set[str]) -> set[str]:
    low = blob.lower()
    found = set()
    for s in secrets:
        for enc in (s.encode(), s.encode("utf-16-le")):
            if enc.lower() in low:
                found.add(s)
    return found


def scan_tree(folder: Path, secrets: set[str]) -> tuple[int, dict[str, set[str]]]:
    n, found = 0, {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        n += 1
        blobs = [p.read_bytes()]
        if zipfile.is_zipfile(p):  # .npz members may be deflated
            with zipfile.ZipFile(p) as z:
                blobs += [z.read(m) for m in z.namelist()]
        hit = set().union(*(leaks(b, secrets) for b in blobs))
        if hit:
            found[str(p.relative_to(folder))] = hit
    return n, found


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_no_dicom_identifier_in_any_output(tmp_path, caplog):
    data = tmp_path / "dicom"
    secrets: set[str] = set()
    for label, names in FILES.items():
        (data / label).mkdir(parents=True)
        for name in names:
            src = Path(get_testdata_file(name))
            shutil.copy(src, data / label / name)
            secrets |= identifiers(src)
    assert len(secrets) >= 25 and {"CompressedSamples^NM1", "St. John's Memorial", "20040826"} <= secrets

    # In-process: the reader and the dataset with every logger at DEBUG.
    caplog.set_level(logging.DEBUG)
    clear_source_cache()
    ds = build_dataset(DataConfig(dataset=f"dicom:{data}", image_size=32, val_fraction=0.2, test_fraction=0.2),
                       "train")
    assert len(ds) >= 6 and ds.num_classes == 2
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records) + repr(ds) + repr(ds.names)
    assert leaks(text.encode(), secrets) == set()

    runs = tmp_path / "runs"
    common = [f"data.dataset=dicom:{data}", "data.image_size=32", "data.val_fraction=0.2",
              "data.test_fraction=0.2", "backbone.arch=cbr_tiny"]
    pre = _run("pretrain/simclr.py", [*common, "split=all", "train.batch_size=8", "train.max_steps=2",
                                      "train.checkpoint_every=1", "train.knn_every=-1", "train.log_every=1",
                                      f"out_dir={runs}/pretrain/simclr", "run_name=phi"], tmp_path)
    export = runs / "pretrain" / "simclr" / "phi" / "backbone.safetensors"
    assert export.is_file()
    fine = _run("finetune/run.py", [*common, f"init={export}", "regime=linear", "optim.epochs=1",
                                    "optim.batch_size=4", "n_bootstrap=20", f"runs_dir={runs}",
                                    f"output_dir={runs}/finetune/phi", "keep_checkpoints=true"], tmp_path)
    logs = tmp_path / "runs" / "logs"
    logs.mkdir()
    for name, proc in (("pretrain", pre), ("finetune", fine)):
        (logs / f"{name}.stdout").write_text(proc.stdout)
        (logs / f"{name}.stderr").write_text(proc.stderr)

    n_files, found = scan_tree(runs, secrets)
    kinds = {p.suffix for p in runs.rglob("*") if p.is_file()}
    assert {".safetensors", ".yaml", ".csv", ".json", ".npz", ".png", ".stdout"} <= kinds, kinds
    assert n_files >= 15
    assert found == {}
    # The scan itself can fail: an identifier planted in a copy of an output is found.
    planted = runs / "finetune" / "phi" / "planted.json"
    planted.write_text('{"note": "Citizen^Jan"}')
    assert scan_tree(runs, secrets)[1] == {"finetune/phi/planted.json": {"Citizen^Jan"}}
    record("patient data", f"{len(FILES['a']) + len(FILES['b'])} pydicom-data files through reader, "
           f"SimCLR and fine-tuning", f"{len(secrets)} identifiers x {n_files} output files: 0 found",
           identifiers=len(secrets), files=n_files)
