"""Batched on-device views: shapes, per-sample randomness, geometry against references, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medpretrain.augment import AugmentConfig, BatchViews, _affine_grid, gaussian_blur, random_affine_matrices

IDENTITY = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip_p=0.0, vflip_p=0.0, rotation_deg=0.0,
                intensity_p=0.0, blur_p=0.0, noise_p=0.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,size", [((5, 1, 33, 34), None), ((3, 3, 28, 28), 20), ((2, 1, 64, 64), 96)])
def test_shapes_range_and_finite(shape, size):
    x = torch.rand(shape)
    y = BatchViews(AugmentConfig(), size=size, mean=0.5, std=0.25)(x, generator=_gen())
    h = size or shape[2]
    w = size or shape[3]
    assert y.shape == (shape[0], shape[1], h, w)
    assert torch.isfinite(y).all()
    # clamped to [0, 1] before normalisation: (0 - 0.5) / 0.25 = -2, (1 - 0.5) / 0.25 = 2
    assert y.min() >= -2 - 1e-6 and y.max() <= 2 + 1e-6


def test_identity_config_is_exact_identity_after_normalisation():
    x = torch.rand(4, 1, 33, 34)
    y = BatchViews(AugmentConfig(**IDENTITY), mean=0.5, std=0.5)(x, generator=_gen())
    torch.testing.assert_close(y, (x - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_affine_grid_matches_torch():
    theta = random_affine_matrices(7, AugmentConfig(rotation_deg=30, hflip_p=0.5, vflip_p=0.5), aspect=33 / 34,
                                   generator=_gen(3))
    torch.testing.assert_close(_affine_grid(theta, 33, 34), F.affine_grid(theta, [7, 1, 33, 34], align_corners=False),
                               atol=1e-6, rtol=0)


def test_flip_only_equals_torch_flip():
    x = torch.rand(6, 1, 9, 11)
    cfg = AugmentConfig(**{**IDENTITY, "hflip_p": 1.0})
    y = BatchViews(cfg, mean=0.0, std=1.0)(x, generator=_gen())
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_matches_rot90():
    # A +-90 degree rotation of a square image resamples exactly onto the grid.
    x = torch.rand(1, 1, 8, 8)
    cfg = AugmentConfig(**{**IDENTITY, "rotation_deg": 90.0})
    theta = random_affine_matrices(1, cfg, generator=_gen())
    angle = math.degrees(math.atan2(theta[0, 1, 0].item(), theta[0, 0, 0].item()))
    theta[:] = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # +90 degrees
    y = F.grid_sample(x, _affine_grid(theta, 8, 8), align_corners=False)
    assert -90 <= angle <= 90
    rotated = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert min((y - r).abs().max().item() for r in rotated) < 1e-5


def test_crop_scale_bounds_the_crop_area():
    cfg = AugmentConfig(crop_scale=[0.3, 0.5], crop_ratio=[1.0, 1.0], rotation_deg=0.0, hflip_p=0.0)
    theta = random_affine_matrices(2000, cfg, generator=_gen())
    area = (theta[:, 0, 0] * theta[:, 1, 1]).abs()  # fraction of the image covered (normalised half-extents)
    assert area.min() >= 0.3 - 1e-5 and area.max() <= 0.5 + 1e-5
    # crop stays inside the image: |centre| + half extent <= 1
    assert ((theta[:, 0, 2].abs() + theta[:, 0, 0].abs()) <= 1 + 1e-5).all()
    assert ((theta[:, 1, 2].abs() + theta[:, 1, 1].abs()) <= 1 + 1e-5).all()


def test_parameters_are_independent_per_sample():
    # The same image repeated 64 times must give 64 different views (not one view broadcast).
    x = torch.rand(1, 1, 28, 28).repeat(64, 1, 1, 1)
    y = BatchViews(AugmentConfig())(x, generator=_gen())
    flat = y.flatten(1)
    d = torch.cdist(flat, flat)
    assert (d + torch.eye(64) * 1e9).min() > 1e-3
    # Flip probability: about half of the samples flipped.
    theta = random_affine_matrices(4000, AugmentConfig(rotation_deg=0.0), generator=_gen(1))
    frac = (theta[:, 0, 0] < 0).float().mean().item()
    assert abs(frac - 0.5) < 0.03


def test_generator_makes_views_reproducible_and_pair_differs():
    x = torch.rand(8, 1, 28, 28)
    views = BatchViews(AugmentConfig())
    a0, a1 = views.pair(x, generator=_gen(5))
    b0, b1 = views.pair(x, generator=_gen(5))
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert (a0 - a1).abs().flatten(1).max(dim=1).values.min() > 1e-3


def test_intensity_only_brightness_scales_pixels():
    x = torch.full((4, 1, 5, 5), 0.5)
    cfg = AugmentConfig(**{**IDENTITY, "intensity_p": 1.0, "brightness": 0.4, "contrast": 0.0, "gamma": [1.0, 1.0]})
    y = BatchViews(cfg, mean=0.0, std=1.0)(x, generator=_gen())
    per_sample = y.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-6)  # uniform image stays uniform
    assert per_sample[:, 0].min() >= 0.5 * 0.6 - 1e-5 and per_sample[:, 0].max() <= 0.5 * 1.4 + 1e-5
    assert per_sample[:, 0].std() > 0.01  # different factors per sample


def test_gaussian_blur_matches_conv_reference_and_preserves_mean():
    x = torch.rand(3, 2, 17, 19)
    sigma = torch.tensor([0.5, 1.0, 0.0])
    y = gaussian_blur(x, sigma)
    torch.testing.assert_close(y[2], x[2])  # sigma 0: identity
    for i in (0, 1):
        r = math.ceil(3 * float(sigma.max()))
        k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma[i] ** 2))
        k = k / k.sum()
        k2 = (k[:, None] * k[None, :]).expand(2, 1, -1, -1)
        ref = F.conv2d(F.pad(x[i : i + 1], (r, r, r, r), mode="reflect"), k2, groups=2)
        torch.testing.assert_close(y[i : i + 1], ref, atol=1e-5, rtol=0)
    assert y[1].std() < x[1].std()


def test_config_validation_names_the_bad_key():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=[0.5, 0.2])
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentConfig(hflip_p=1.5)
    with pytest.raises(ValueError, match="padding_mode"):
        AugmentConfig(padding_mode="wrap")
    with pytest.raises(ValueError, match="B, C, H, W"):
        BatchViews()(torch.rand(28, 28))


def test_config_loads_from_overrides():
    import dataclasses

    from medpretrain.config import load_config

    @dataclasses.dataclass
    class C:
        aug: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    cfg = load_config(C, ["aug.crop_scale=[0.2,0.9]", "aug.rotation_deg=5"])
    assert cfg.aug.crop_scale == [0.2, 0.9] and cfg.aug.rotation_deg == 5.0
