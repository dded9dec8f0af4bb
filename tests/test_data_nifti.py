"""NIfTI reader: slicing axis and orientation, percentile scaling, empty slices, groups and bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.nifti import load_nifti, read_nifti_source, scale_volume


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def volume(shape=(20, 24, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 30.0, size=shape).astype(np.float32)


def reference_scale(v: np.ndarray) -> np.ndarray:
    """Naive reference: clip to the 0.5 / 99.5 percentiles, map to [0, 1]."""
    lo, hi = np.percentile(v.astype(np.float64), [0.5, 99.5])
    return (np.clip(v.astype(np.float64), lo, hi) - lo) / (hi - lo)


def test_slices_count_axis_and_display_orientation(tmp_path):
    v = volume()
    f = save(tmp_path / "vol.nii.gz", v)
    ref = reference_scale(v)
    for axis, n, hw in ((2, 10, (24, 20)), (1, 24, (10, 20)), (0, 20, (10, 24))):
        keep, s = load_nifti(f, slice_axis=axis)
        assert keep == list(range(n)) and s.shape == (n, 1, *hw) and s.dtype == np.float32
        for k in (0, n // 2, n - 1):
            plane = np.take(ref, k, axis=axis)
            np.testing.assert_allclose(s[k, 0], plane[::-1, ::-1].T, atol=1e-5)


def test_percentile_scaling():
    v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    v[0, 0, 0] = 1e6  # one hot voxel does not compress the rest
    out = scale_volume(v)
    np.testing.assert_allclose(out, reference_scale(v), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out == 0).sum() == 5 and (out == 1).sum() == 5  # 0.5 % of 1000 voxels at each end
    assert 0.49 < float(np.median(out)) < 0.51
    # mostly-zero volume: percentiles coincide -> min-max; constant -> zeros; NaN -> 0
    sparse = np.zeros((10, 10, 10), np.float32)
    sparse[5, 5, 5] = 7.0
    assert scale_volume(sparse).max() == 1.0 and scale_volume(sparse).sum() == 1.0
    assert not scale_volume(np.full((3, 3, 3), 5.0, np.float32)).any()
    nan = v.copy()
    nan[1, 1, 1] = np.nan
    assert np.isfinite(scale_volume(nan)).all() and scale_volume(nan)[1, 1, 1] == 0.0


def test_reorientation_to_ras(tmp_path):
    """The same anatomy stored in LPS voxel order gives the same slices as in RAS order."""
    v = volume((12, 14, 6))
    ras = save(tmp_path / "ras.nii", v)
    lps = save(tmp_path / "lps.nii", v[::-1, ::-1, :].copy(), np.diag([-1.0, -1.0, 1.0, 1.0]))
    for axis in (0, 1, 2):
        np.testing.assert_allclose(load_nifti(lps, axis)[1], load_nifti(ras, axis)[1], atol=1e-6)


def test_4d_uses_first_volume_and_2d_is_one_slice(tmp_path):
    v4 = np.stack([volume((8, 9, 5), seed=s) for s in range(3)], axis=-1)
    keep, s = load_nifti(save(tmp_path / "bold.nii.gz", v4))
    keep3, s3 = load_nifti(save(tmp_path / "first.nii.gz", v4[..., 0]))
    assert keep == keep3 == list(range(5))
    np.testing.assert_allclose(s, s3, atol=1e-6)
    keep, s = load_nifti(save(tmp_path / "flat.nii", volume((8, 9))))
    assert keep == [0] and s.shape == (1, 1, 9, 8)


def test_empty_slices_skipped(tmp_path):
    v = np.zeros((16, 16, 10), np.float32)
    v[4:12, 4:12, 2:8] = volume((8, 8, 6))
    f = save(tmp_path / "padded.nii.gz", v)
    keep, s = load_nifti(f)
    assert keep == list(range(2, 8)) and len(s) == 6
    keep, s = load_nifti(f, skip_empty=False)
    assert keep == list(range(10)) and not s[0].any()
    src = read_nifti_source(f, DataConfig(image_size=8), SkipLog())
    assert src.names == [f"padded.nii.gz#{k}" for k in range(2, 8)]
    with pytest.raises(DataError, match="constant"):
        load_nifti(save(tmp_path / "blank.nii.gz", np.zeros((4, 4, 4), np.float32)))


def test_source_groups_names_labels_channels(tmp_path):
    save(tmp_path / "a.nii.gz", volume((10, 12, 4), 1))
    save(tmp_path / "b.nii", volume((10, 12, 3), 2))
    (tmp_path / "notes.txt").write_text("ignored")
    src = read_nifti_source(tmp_path, DataConfig(image_size=16, channels=3), SkipLog())
    assert src.task == "unlabeled" and src.labels is None
    assert src.names == [f"a.nii.gz#{k}" for k in range(4)] + [f"b.nii#{k}" for k in range(3)]
    assert src.images.shape == (7, 3, 16, 16) and src.images.dtype == np.float32
    assert np.isfinite(src.images).all() and src.images.min() >= 0 and src.images.max() <= 1
    assert np.array_equal(src.images[:, 0], src.images[:, 2])
    assert len(set(src.groups[:4])) == 1 and len(set(src.groups[4:])) == 1 and src.groups[0] != src.groups[4]
    assert not any("a.nii" in g for g in src.groups)
    assert [p.name for p in src.files] == ["a.nii.gz", "b.nii"]
    # class sub-folders and BIDS subjects: all volumes of sub-01 share one group
    bids = tmp_path / "bids"
    for i, (cls, sub) in enumerate((("control", "sub-01"), ("control", "sub-02"), ("patient", "sub-03"))):
        for j, mod in enumerate(("T1w", "T2w")):
            save(bids / cls / sub / "anat" / f"{sub}_{mod}.nii.gz", volume((6, 6, 2), 10 * i + j))
    src = read_nifti_source(bids, DataConfig(image_size=8, slice_axis=2), SkipLog())
    assert src.class_names == ["control", "patient"] and src.task == "binary"
    assert src.labels.tolist() == [0] * 8 + [1] * 4
    assert len(set(src.groups[:4])) == 1 and len(set(src.groups)) == 3


def test_corrupt_and_bad_files(tmp_path):
    good = save(tmp_path / "good.nii.gz", volume((8, 8, 4)))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not gzip" * 20)
    (tmp_path / "junk.nii").write_bytes(b"\x01" * 400)
    (tmp_path / "empty.nii").write_bytes(b"")
    for name in ("cut.nii.gz", "junk.nii.gz", "junk.nii", "empty.nii"):
        with pytest.raises(DataError) as info:
            load_nifti(tmp_path / name)
        assert info.value.path.endswith(name) and len(info.value.reason) > 10, info.value.reason
    with pytest.raises(DataError, match="empty file"):
        load_nifti(tmp_path / "empty.nii")
    with pytest.raises(DataError, match="truncated gzip"):
        load_nifti(tmp_path / "cut.nii.gz")
    with pytest.raises(DataError, match="not a NIfTI file"):
        load_nifti(tmp_path / "junk.nii")
    with pytest.raises(DataError):
        read_nifti_source(tmp_path, DataConfig(image_size=8), SkipLog())
    log = SkipLog(skip_bad=True)
    src = read_nifti_source(tmp_path, DataConfig(image_size=8), log)
    assert src.names == [f"good.nii.gz#{k}" for k in range(4)]
    assert sorted(Path(p).name for p, _ in log.skipped) == ["cut.nii.gz", "empty.nii", "junk.nii", "junk.nii.gz"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no NIfTI files"):
        read_nifti_source(tmp_path / "nothing", DataConfig(), SkipLog())
    with pytest.raises(ConfigError, match="slice_axis"):
        read_nifti_source(good, DataConfig(slice_axis=3), SkipLog())
    raw = save(tmp_path / "nothing" / "raw.nii", volume((8, 8, 4)))
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated NIfTI data"):
        load_nifti(raw)
