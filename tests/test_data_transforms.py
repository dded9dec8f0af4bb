"""Paired dictionary transforms and the reader helpers (resize, channel conversion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpretrain.data.transforms import (
    Compose,
    MapImage,
    PairedRandomCrop,
    PairedRandomFlip,
    resize,
    to_channels,
)


def sample(h: int = 33, w: int = 34) -> dict:
    image = torch.arange(2 * h * w, dtype=torch.float32).reshape(2, h, w)
    return {"image": image, "mask": image[:1] * 2, "roi": image[1:] * 3, "index": 7}


def test_paired_crop_moves_together_and_is_seeded():
    s = sample()
    out = PairedRandomCrop((16, 15), seed=0)(s)
    assert out["image"].shape == (2, 16, 15) and out["mask"].shape == (1, 16, 15) and out["index"] == 7
    torch.testing.assert_close(out["mask"], out["image"][:1] * 2)
    torch.testing.assert_close(out["roi"], out["image"][1:] * 3)
    again = PairedRandomCrop((16, 15), seed=0)(s)
    assert torch.equal(again["image"], out["image"])
    crops = {PairedRandomCrop(16, seed=k)(s)["image"][0, 0, 0].item() for k in range(8)}
    assert len(crops) > 1


def test_paired_crop_pads_small_inputs():
    out = PairedRandomCrop(40, seed=1)(sample(33, 34))
    assert out["image"].shape == (2, 40, 40) and out["roi"][:, 33:, :].abs().sum() == 0


def test_paired_flip_and_compose():
    s = sample()
    out = PairedRandomFlip(prob=1.0, axes=(-1,))(s)
    assert torch.equal(out["image"], s["image"].flip(-1)) and torch.equal(out["mask"], s["mask"].flip(-1))
    assert PairedRandomFlip(prob=0.0)(s) is s
    chain = Compose([PairedRandomCrop(8, seed=3), PairedRandomFlip(seed=3), MapImage(lambda x: x + 1)])
    out = chain(s)
    torch.testing.assert_close(out["mask"], (out["image"][:1] - 1) * 2)
    with pytest.raises(ValueError, match="prob must be in"):
        PairedRandomFlip(prob=2.0)


def test_resize_matches_torch_antialias_and_nearest_keeps_binary():
    x = np.random.default_rng(0).random((3, 33, 34)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=(17, 9), mode="bilinear", antialias=True)[0].numpy()
    np.testing.assert_allclose(resize(x, (17, 9)), ref, atol=1e-5)
    m = (x[:1] > 0.5).astype(np.float32)
    assert set(np.unique(resize(m, 50, nearest=True))) == {0.0, 1.0}
    assert resize(x[None], 8).shape == (1, 3, 8, 8)


def test_to_channels():
    rgb = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(to_channels(rgb, 1)[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2], rtol=1e-6)
    grey = rgb[:1]
    assert np.array_equal(to_channels(np.repeat(grey, 3, 0), 1), grey)
    assert to_channels(grey, 3).shape == (3, 4, 5)
