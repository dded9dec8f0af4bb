"""Reliability: a table of broken inputs, through the library (``read_source`` / ``load_config``) and through
the real entry scripts (``pretrain/simclr.py``, ``finetune/run.py``, ``generative/vae.py``).

In the library each case must raise one line naming the file and the reason, and become one counted skip
under ``data.skip_bad`` where the bad item is one file among good ones. Through a script, run as
``python <script>`` (its exit status is the script's own; ``accelerate launch`` would add its traceback and
exit 1, see README's "Errors"), the whole of stderr must be exactly that one line, ``error: <message>``,
the exit status 2, and the run folder the invocation is given (an earlier interrupted run of the same
script with its ``config.yaml``, ``metrics.csv`` and checkpoints, continued with ``resume=auto``) must be
byte-identical afterwards, file for file. Outcomes are recorded for ``benchmarks/results/reliability.md``
(see ``tests/reliability_record.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, SecondaryCaptureImageStorage, generate_uid
from reliability_record import record

from medpretrain.config import BackboneConfig, ConfigError, DataConfig, load_config
from medpretrain.data import DataError, clear_source_cache, read_source

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Builders: each writes good files plus one bad one under ``root`` and returns (spec, bad file name)
# --------------------------------------------------------------------------------------------


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)
    return path


def _dcm(path: Path, pixels: np.ndarray | None = None) -> Path:
    px = np.arange(64, dtype=np.uint16).reshape(8, 8) if pixels is None else pixels
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "RELIABILITY-1"
    ds.set_pixel_data(px, "MONOCHROME2", 12 if px.dtype == np.uint16 else 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _good_dicoms(root: Path) -> None:
    for i in range(3):
        _dcm(root / "a" / f"good{i}.dcm")
        _dcm(root / "b" / f"fine{i}.dcm")


def dicom_truncated(root: Path) -> tuple[str, str]:
    _good_dicoms(root)
    big = _dcm(root / "tmp_big.dcm", np.ones((64, 64), np.uint16)).read_bytes()
    (root / "tmp_big.dcm").unlink()
    (root / "a" / "cut.dcm").write_bytes(big[:-3000])
    return f"dicom:{root}", "cut.dcm"


def dicom_corrupt(root: Path) -> tuple[str, str]:
    _good_dicoms(root)
    good = (root / "a" / "good0.dcm").read_bytes()
    # a real preamble and 'DICM' marker followed by garbage where the elements should be
    (root / "a" / "corrupt.dcm").write_bytes(good[:132] + b"\xff\xfe\x00\x01" * 64)
    return f"dicom:{root}", "corrupt.dcm"


def dicom_no_pixels(root: Path) -> tuple[str, str]:
    _good_dicoms(root)
    ds = pydicom.dcmread(root / "a" / "good0.dcm")
    del ds.PixelData
    ds.save_as(root / "a" / "nopix.dcm")
    return f"dicom:{root}", "nopix.dcm"


def dicom_unsupported_syntax(root: Path) -> tuple[str, str]:
    _good_dicoms(root)
    ds = pydicom.dcmread(root / "a" / "good0.dcm")
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 12])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(root / "a" / "mpeg.dcm")
    return f"dicom:{root}", "mpeg.dcm"


def _good_pngs(root: Path) -> None:
    for i in range(3):
        _png(root / "a" / f"good{i}.png", i)
        _png(root / "b" / f"fine{i}.png", 10 + i)


def png_zero_bytes(root: Path) -> tuple[str, str]:
    _good_pngs(root)
    (root / "a" / "zero.png").write_bytes(b"")
    return f"folder:{root}", "zero.png"


def png_text_file(root: Path) -> tuple[str, str]:
    _good_pngs(root)
    (root / "a" / "notes.png").write_text("this is a text file, not an image\n")
    return f"folder:{root}", "notes.png"


def tiff_nan(root: Path) -> tuple[str, str]:
    _good_pngs(root)
    arr = np.ones((10, 12), np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr).save(root / "b" / "nan.tif")
    return f"folder:{root}", "nan.tif"


def manifest_label_out_of_range(root: Path) -> tuple[str, str]:
    rows = []
    for i in range(6):
        _png(root / f"{i}.png", i)
        rows.append(f"{i}.png,{i % 2}")
    rows.append("5.png,7")
    (root / "labels.csv").write_text("image_path,label\n" + "\n".join(rows) + "\n")
    return f"folder:{root / 'labels.csv'}", "labels.csv"


def mask_size_mismatch(root: Path) -> tuple[str, str]:
    for i in range(3):
        _png(root / "img" / f"{i}_a.png", i)
        _png(root / "msk" / f"{i}_m.png", 20 + i)
    _png(root / "img" / "9_a.png", 9)
    _png(root / "msk" / "9_m.png", 9, size=(5, 5))
    return f"segpairs:{root / 'img'},{root / 'msk'}", "9_m.png"


def npz_wrong_shape(root: Path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    arrays["train_images"] = np.zeros((6, 28), np.uint8)
    np.savez(root / "breastmnist_28.npz", **arrays)
    return "medmnist:breastmnist", "breastmnist_28.npz"


def nifti_constant_volume(root: Path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 4)).astype(np.float32), np.eye(4)), root / f"ok{i}.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), 3.0, np.float32), np.eye(4)), root / "flat.nii.gz")
    return f"nifti:{root}", "flat.nii.gz"


def write_png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 1-bit PNG of ``width x height`` zeros (30000 x 30000: 900 million pixels in ~110 kB)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row, deflate = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grey, deflate, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def png_bomb(root: Path) -> tuple[str, str]:
    _good_pngs(root)
    write_png_bomb(root / "b" / "bomb.png")
    return f"folder:{root}", "bomb.png"


def png_above_limit(root: Path) -> tuple[str, str]:
    _good_pngs(root)  # 12 x 10 = 120 pixels each
    _png(root / "a" / "large.png", 5, size=(40, 40))
    return f"folder:{root}", "large.png"


def dicom_bomb_header(root: Path) -> tuple[str, str]:
    _good_dicoms(root)
    ds = pydicom.dcmread(root / "a" / "good0.dcm")
    ds.Rows = ds.Columns = 30000  # the header claims 900 million pixels; 128 bytes of pixel data follow
    ds.save_as(root / "a" / "huge.dcm")
    return f"dicom:{root}", "huge.dcm"


def nifti_bomb_header(root: Path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 4)).astype(np.float32), np.eye(4)), root / f"ok{i}.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((4096, 4096, 4096))  # 2**36 voxels claimed, 64 bytes present
    header.set_data_offset(352)
    (root / "huge.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    return f"nifti:{root}", "huge.nii"


def empty_folder(root: Path) -> tuple[str, str]:
    (root / "empty" / "sub").mkdir(parents=True)
    return f"folder:{root / 'empty'}", "empty"


@dataclass
class Case:
    build: Callable[[Path], tuple[str, str]]
    reason: str
    skippable: bool  # one bad file among good ones: skip_bad turns it into a counted skip
    kw: dict = field(default_factory=dict)
    n_left: int = 6  # samples left under skip_bad (6 good files; 2 NIfTI volumes x 4 slices; 3 image/mask pairs)
    script: str = "finetune"  # the entry script that reads it (EARLIER), with the run folder it is given
    extra: tuple[str, ...] = ()  # its further options


CASES = {
    "truncated DICOM": Case(dicom_truncated, "truncated pixel data", True, script="simclr"),
    "corrupt DICOM (garbage after the DICM marker)": Case(dicom_corrupt, "no pixel data", True, script="simclr"),
    "DICOM without pixel data": Case(dicom_no_pixels, "no pixel data", True, script="vae"),
    "unsupported transfer syntax": Case(dicom_unsupported_syntax, "unsupported transfer syntax", True),
    "zero-byte PNG": Case(png_zero_bytes, "empty file (0 bytes)", True),
    "text file named .png": Case(png_text_file, "not a readable image", True),
    "NaN image": Case(tiff_nan, "NaN or infinite", True, script="vae"),
    "constant NIfTI volume": Case(nifti_constant_volume, "constant", True, n_left=8, script="simclr"),
    "label out of range": Case(manifest_label_out_of_range, "label 7 out of range", True),
    "mask size differs from image": Case(mask_size_mismatch, "differs from image", True, n_left=3,
                                         extra=("task=segmentation",)),
    "wrong-shaped .npz": Case(npz_wrong_shape, "train_images has shape", False, script="vae"),
    "empty folder": Case(empty_folder, "no images found", False, script="simclr"),
    "decompression bomb PNG (30000x30000, 110 kB)": Case(
        png_bomb, "bomb.png: image has 900000000 pixels, above the limit of 268435456 (data.max_pixels)", True),
    "image above data.max_pixels": Case(
        png_above_limit, "large.png: image has 1600 pixels, above the limit of 500 (data.max_pixels)", True,
        {"max_pixels": 500}, script="vae"),
    "DICOM header claiming 30000x30000": Case(
        dicom_bomb_header, "huge.dcm: image has 900000000 pixels, above the limit of 268435456 (data.max_pixels)",
        True, script="simclr"),
    "NIfTI header claiming 4096^3 voxels": Case(
        nifti_bomb_header, "huge.nii: volume has 68719476736 voxels, above the limit of 268435456 (data.max_pixels)",
        True, n_left=8, script="vae"),
}


def library_error(spec: str, root: Path, kw: dict) -> str:
    """The one-line ``DataError`` message of reading ``spec`` in this process."""
    clear_source_cache()
    cfg = DataConfig(dataset=spec, root=str(root), image_size=8, val_fraction=0.2, test_fraction=0.2, **kw)
    with pytest.raises(DataError) as e:
        read_source(cfg)
    return str(e.value)


@pytest.mark.parametrize("name", list(CASES))
def test_broken_input_one_line_named_and_skippable(tmp_path, name):
    case = CASES[name]
    root = tmp_path / "data"
    root.mkdir()
    spec, bad = case.build(root)
    msg = library_error(spec, root, case.kw)
    assert "\n" not in msg and bad in msg and case.reason in msg, msg
    if case.skippable:
        assert_one_counted_skip(case, spec, root, bad)


def assert_one_counted_skip(case: Case, spec: str, root: Path, bad: str) -> None:
    """Under ``data.skip_bad`` the bad item is the one skip and every other sample is kept."""
    clear_source_cache()
    src = read_source(DataConfig(dataset=spec, root=str(root), image_size=8, skip_bad=True, **case.kw))
    assert [Path(p).name for p, _ in src.skipped] == [bad], src.skipped
    assert len(src) == case.n_left, len(src)  # everything but the bad item


BAD_CONFIGS = {  # name: (YAML text, the script given it, fragments of its one line)
    "unknown config key": ("data:\n  imagesize: 32\n", "finetune", ["data.imagesize", "unknown"]),
    "wrong config type": ("data:\n  image_size: large\n", "simclr", ["data.image_size", "is not int"]),
    "YAML python object": ("seed: !!python/object/apply:os.system ['echo pwned']\n", "vae",
                           ["bad_config.yaml", "not valid YAML"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_file_named(tmp_path, name):
    @dataclass
    class Cfg:
        data: DataConfig = field(default_factory=DataConfig)
        backbone: BackboneConfig = field(default_factory=BackboneConfig)
        seed: int = 0

    text, _, fragments = BAD_CONFIGS[name]
    path = tmp_path / "bad_config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, ["--config", str(path)])
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


# --------------------------------------------------------------------------------------------
# Through the entry scripts, into the folder of an earlier interrupted run
# --------------------------------------------------------------------------------------------

TINY_STEPS = ["train.batch_size=16", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2"]
SCRIPTS = {  # name: (entry script, tiny options, options naming the run folder <parent>/<name>, resume option)
    "simclr": ("pretrain/simclr.py", ["backbone.arch=cbr_tiny", *TINY_STEPS, "train.knn_every=-1"],
               lambda run: [f"out_dir={run.parent}", f"run_name={run.name}"], "train.resume=auto"),
    "vae": ("generative/vae.py", ["backbone.arch=cbr_tiny", *TINY_STEPS, "train.grid_size=4", "train.log_with=none"],
            lambda run: [f"out_dir={run.parent}", f"run_name={run.name}"], "train.resume=auto"),
    "finetune": ("finetune/run.py", ["backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=2", "optim.max_steps_per_epoch=2",
                                     "optim.batch_size=32", "optim.eval_batch_size=512", "n_bootstrap=10",
                                     "data.label_fraction=0.05"],
                 lambda run: [f"output_dir={run}"], "resume=auto"),
}


def run_script(name: str, run: Path, args: list[str], data_root: Path,
               env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python <script> <tiny options> <run folder> <args>``: the script's own stderr and exit status."""
    script, tiny, where, _ = SCRIPTS[name]
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("MEDPRETRAIN_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / script), *tiny, *where(run), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=run.parent)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (``None``) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, data_root) -> Callable[[str], Path]:
    """``earlier(script)``: the folder of a run of ``script`` on PneumoniaMNIST killed after step 3 (its
    step-2 / epoch-1 checkpoint complete), made once per module; tests work on copies."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            run = tmp_path_factory.mktemp(f"earlier_{name}") / "earlier"
            proc = run_script(name, run, [], data_root, {"MEDPRETRAIN_FAULT_EXIT_AT_STEP": "3"})
            assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-3000:]
            names = {p.name for p in run.iterdir()}
            assert {"config.yaml", "metrics.csv", "checkpoints"} <= names, names
            assert any((run / "checkpoints").iterdir())
            made[name] = run
        return made[name]

    return get


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst)
    return dst


def assert_one_line(proc: subprocess.CompletedProcess, line: str) -> None:
    """The whole of stderr is ``line`` and the exit status 2 (no warning, no traceback, nothing else)."""
    assert (proc.returncode, proc.stderr) == (2, line + "\n"), (proc.returncode, proc.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_script_stops_with_exactly_one_line_and_keeps_the_run_folder(name, tmp_path, earlier, data_root):
    """The case's entry script, asked to continue an earlier interrupted run on the broken data, prints only
    ``error: <the library's message>``, exits 2 and leaves that run's folder byte-identical."""
    case = CASES[name]
    root = tmp_path / "data"
    root.mkdir()
    spec, bad = case.build(root)
    msg = library_error(spec, root, case.kw)
    run = copy_of(earlier(case.script), tmp_path)
    before = tree(run)
    proc = run_script(case.script, run, [f"data.dataset={spec}", f"data.root={root}", "data.val_fraction=0.2",
                                         "data.test_fraction=0.2", *(f"data.{k}={v}" for k, v in case.kw.items()),
                                         *case.extra, SCRIPTS[case.script][3]], data_root)
    assert_one_line(proc, f"error: {msg}")
    assert tree(run) == before
    outcome = "error naming file and reason"
    if case.skippable:
        assert_one_counted_skip(case, spec, root, bad)
        outcome += "; skip_bad: 1 counted skip"
    record("bad input", name, f"{outcome}; through {SCRIPTS[case.script][0]}: stderr exactly that line, exit 2, "
           "the earlier run's folder byte-identical", message=msg[-160:])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_script_with_bad_config_file_stops_with_exactly_one_line(name, tmp_path, earlier, data_root):
    text, script, fragments = BAD_CONFIGS[name]
    path = tmp_path / "bad_config.yaml"
    path.write_text(text)
    run = copy_of(earlier(script), tmp_path)
    before = tree(run)
    proc = run_script(script, run, ["--config", str(path), SCRIPTS[script][3]], data_root)
    line = proc.stderr.removesuffix("\n")
    assert "\n" not in line and line.startswith("error: ") and all(f in line for f in fragments), proc.stderr[-3000:]
    assert_one_line(proc, line)
    assert tree(run) == before
    record("bad input", name, f"ConfigError naming key/file; through {SCRIPTS[script][0]}: stderr exactly that "
           "line, exit 2, the earlier run's folder byte-identical", message=line[-160:])


def test_pixel_limit_is_inclusive_zero_disables_it_and_pil_keeps_its_own(tmp_path):
    from medpretrain.data.folder import load_image

    f = _png(tmp_path / "x.png", 0, size=(40, 40))
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert load_image(f, 1, max_pixels=1600).shape == (1, 40, 40)
    assert load_image(f, 1, max_pixels=0).shape == (1, 40, 40)
    with pytest.raises(DataError) as e:
        load_image(f, 1, max_pixels=1599)
    assert str(e.value) == f"{f}: image has 1600 pixels, above the limit of 1599 (data.max_pixels)"
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # the reader's switch of PIL's own check is undone
    with pytest.raises(ConfigError, match="data.max_pixels must be positive or 0"):
        read_source(DataConfig(dataset=f"folder:{tmp_path}", max_pixels=-1))
