"""medpretrain.audit parts against naive references and toy cases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from medpretrain import audit


def naive_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as loops over pairs."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_fid_kid_match_naive_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = rng.normal(loc=0.3, scale=1.4, size=(40, 6)) @ rng.normal(size=(6, 6)) * 0.5
    # One KID subset of all samples: the random subset is then the whole set and the value exact.
    got = audit.fid_kid(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=1, kid_subset_size=40)
    assert got["fid"] == pytest.approx(naive_fid(a, b), rel=1e-6)
    assert got["kid"] == pytest.approx(naive_kid(a, b), rel=1e-6, abs=1e-9)
    same = audit.fid_kid(torch.from_numpy(a), torch.from_numpy(a), kid_subsets=1, kid_subset_size=40)
    assert abs(same["fid"]) < 1e-6 and same["kid"] < 0  # unbiased MMD of a set with itself is slightly negative


def test_fid_kid_reproducible_and_checked():
    a, b = torch.randn(50, 4), torch.randn(50, 4) + 1
    r1 = audit.fid_kid(a, b, kid_subsets=5, kid_subset_size=20, seed=3)
    r2 = audit.fid_kid(a, b, kid_subsets=5, kid_subset_size=20, seed=3)
    assert r1 == r2 and r1["kid_subset_size"] == 20
    with pytest.raises(ValueError, match="features"):
        audit.fid_kid(a, torch.randn(50, 5))


def test_prdc_toy_2d_known_answers():
    # Four reals on the unit square's corners: with k=1 each real ball has radius 1.
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # (0.5, 0) lies in the balls of (0,0) and (1,0); (5, 5) in none. The fakes' mutual distance
    # (6.73) makes each fake ball cover every real, so recall is 1.
    fake = torch.tensor([[0.5, 0.0], [5.0, 5.0]])
    got = audit.prdc(real, fake, k=1)
    assert got["precision"] == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(1.0)
    assert got["density"] == pytest.approx((2 + 0) / (1 * 2))
    assert got["coverage"] == pytest.approx(0.5)  # balls of (0,0) and (1,0) hold a fake
    # Identical sets: every point is in its own ball.
    same = audit.prdc(real, real.clone(), k=1)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    with pytest.raises(ValueError, match="k"):
        audit.prdc(real, fake, k=2)


def test_memorisation_flags_copies_and_ignores_dataset_duplicates():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(60, 1, 9, 7, generator=g)
    heldout = torch.rand(200, 1, 9, 7, generator=g)
    heldout[0] = train[3]  # a duplicate inside the dataset: must not pull the threshold to 0
    fresh = torch.rand(100, 1, 9, 7, generator=g)  # as unseen as the held-out images
    fake = torch.cat([train[[5, 17, 42]], fresh])
    feat = lambda x: x.flatten(1)[:, :20] - 0.5  # noqa: E731 (any deterministic map)
    res = audit.memorisation(fake, train, heldout, feat(fake), feat(train), feat(heldout), quantile=0.05)
    assert res.heldout_duplicates.tolist() == [True] + [False] * 199
    for space in ("pixel", "feature"):
        s = res.spaces[space]
        assert s.threshold > 0
        assert s.flagged[:3].all() and s.index[:3].tolist() == [5, 17, 42]
        assert float(s.distance[:3].max()) < 1e-6
        assert int(s.flagged[3:].sum()) <= 12  # about 5 expected: the quantile, for unseen images
    assert res.flagged[:3].all() and res.rule == "both"
    assert int(res.flagged.sum()) <= int(audit.memorisation(fake, train, heldout, feat(fake), feat(train), feat(heldout),
                                                            quantile=0.05, rule="any").flagged.sum())
    with pytest.raises(ValueError, match="quantile"):
        audit.memorisation(fake, train, heldout, quantile=1.0)


def test_nearest_neighbours_against_loop():
    q, b = torch.randn(7, 5), torch.randn(11, 5)
    dist, idx = audit.nearest_neighbours(q, b, chunk=3)
    for i in range(7):
        d = [(float((q[i] - b[j]).norm()), j) for j in range(11)]
        best = min(d)
        assert idx[i] == best[1] and float(dist[i]) == pytest.approx(best[0], rel=1e-5)


def test_load_fake_images_npz_layouts_and_folder(tmp_path: Path):
    grey = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=grey)
    x = audit.load_fake_images(tmp_path / "s.npz", (28, 28), 1)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.from_numpy(grey / 255.0).float())
    # MedMNIST layout, RGB, another size: converted to grey and resized.
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "m.npz", train_images=rgb, train_labels=np.zeros((3, 1)))
    y = audit.load_fake_images(tmp_path / "m.npz", (28, 28), 1)
    assert y.shape == (3, 1, 28, 28) and 0 <= float(y.min()) and float(y.max()) <= 1
    # A folder holding samples.npz (generative/sample.py's output) and a folder of PNGs.
    (tmp_path / "run").mkdir()
    np.savez(tmp_path / "run" / "samples.npz", images=grey)
    assert torch.equal(audit.load_fake_images(tmp_path / "run", (28, 28), 1), x)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(grey):
        Image.fromarray(im).save(tmp_path / "png" / f"sample_{i:05d}.png")
    z = audit.load_fake_images(tmp_path / "png", (28, 28), 1)
    assert torch.allclose(z, x)
    np.savez(tmp_path / "bad.npz", a_images=grey, b_images=grey)
    with pytest.raises(ValueError, match="fake_key"):
        audit.load_fake_images(tmp_path / "bad.npz", (28, 28), 1)
    np.savez(tmp_path / "f.npz", images=grey.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit.load_fake_images(tmp_path / "f.npz", (28, 28), 1)
    with pytest.raises(FileNotFoundError):
        audit.load_fake_images(tmp_path / "missing.npz", (28, 28), 1)


def test_cross_fit_scores_every_image_out_of_fold():
    """Separable toy images (bright vs dark) with a tiny CBR net: every image scored once, AUC 1."""
    from medpretrain.backbones import build_backbone

    torch.manual_seed(0)
    real = torch.rand(24, 1, 8, 8) * 0.5 + 0.5
    fake = torch.rand(18, 1, 8, 8) * 0.5 - 1.0
    res = audit.cross_fit_discriminator(audit.copy_factory(build_backbone("cbr_tiny", 1, "small")), real, fake,
                                        folds=3, epochs=3, batch_size=8, lr=1e-2, pretrained=False)
    assert res.real_scores.shape == (24,) and res.fake_scores.shape == (18,)
    assert sorted(res.fake_fold.bincount().tolist()) == [6, 6, 6]
    assert res.auc > 0.95 and len(res.fold_auc) == 3
    assert res.null_sd == pytest.approx(((24 + 18 + 1) / (12 * 24 * 18)) ** 0.5)


def test_recalibrate_batchnorm_is_the_exact_average_over_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3))
    x = torch.randn(10, 1, 4, 4) * 2 + 3
    audit.recalibrate_batchnorm(model, x, batch_size=5)
    with torch.no_grad():
        h = model[0](x)
    batches = [h[:5], h[5:]]
    assert torch.allclose(model[1].running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0), atol=1e-5)
    var = torch.stack([b.transpose(0, 1).flatten(1).var(1, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)
    assert model[1].momentum == 0.1 and not model.training
