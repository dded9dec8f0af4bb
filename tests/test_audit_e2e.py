"""scripts/audit_synthetic.py end to end on real PneumoniaMNIST (28 px): numbers and outputs.

Small and CPU-fast: a CBR-tiny backbone, ~150 images a side, a 3-fold discriminator trained 3 epochs.
The realism checks use real images, uniform noise and heavily blurred real images as "fakes"; the
memorisation check plants training images among the fakes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, save_backbone
from medpretrain.config import DataConfig
from medpretrain.data import build_dataset

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "audit_synthetic.py"
N = 150
COPIES = [3, 10, 500, 1234, 3000, 3881]  # training-split positions planted among the fakes


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("audit_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_synthetic"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real(data_root):
    cfg = DataConfig(root=str(data_root))
    val = build_dataset(cfg, "val", normalize=False)
    train = build_dataset(cfg, "train", unlabeled=True, normalize=False)
    # Validation images in the training split's class mix (this copy's train split is 10% normal, val 26%):
    # otherwise "real vs real" differs in prevalence and a discriminator can learn that.
    normal, pneumonia = np.flatnonzero(val.labels.ravel() == 0), np.flatnonzero(val.labels.ravel() == 1)
    pick = np.concatenate([normal[: N // 10], pneumonia[: N - N // 10]])
    return {"val": torch.stack([val[int(i)]["image"] for i in pick]),
            "train": torch.stack([train[i]["image"] for i in COPIES])}


def write_npz(path: Path, images: torch.Tensor) -> Path:
    np.savez(path, images=(images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return path


def run(script, data_root, tmp: Path, fake: Path, *extra: str) -> dict:
    out = tmp / "audit"
    args = [f"data.root={data_root}", f"--fake={fake}", f"out={out}", "arch=cbr_tiny", f"n_real={N}",
            f"n_fake={N + 20}", "memo.n_heldout=300", "disc.epochs=3", "disc.batch_size=32", "disc.lr=2e-3",
            "kid_subset_size=50", "kid_subsets=10", "memo.n_train=800", *extra]
    return script.main(args)


def test_real_against_real_with_planted_copies(script, real, data_root, tmp_path):
    """Fakes = unseen real images (validation) + 6 training images: AUC ~0.5, FID ~baseline, copies flagged."""
    fakes = torch.cat([real["val"], real["train"]])
    # All training images are the memorisation reference (so the planted copies are in it); the test split
    # calibrates the threshold so the validation "fakes" are as unseen as the calibration images.
    r = run(script, data_root, tmp_path, write_npz(tmp_path / "real.npz", fakes),
            "backbone=scratch", "memo.n_train=0", "heldout_split=test")
    out = tmp_path / "audit"
    auc = r["discriminator"]["auc"]
    fid, base = r["distribution"]["fake"]["fid"], r["distribution"]["real_baseline"]["fid"]
    assert 0.35 < auc < 0.65, auc
    assert fid < 3 * base, (fid, base)
    assert r["distribution"]["fake"]["precision"] > 0.5
    flagged = np.array([p["flagged"] for p in r["per_image"]])
    assert flagged[N:].all(), "planted training images must be flagged as memorised"
    assert flagged[:N].mean() < 0.1, flagged[:N].mean()
    copies = r["per_image"][N:]
    assert all(p["nn_pixel"]["distance"] < 1e-6 and p["nn_feature"]["distance"] < 1e-4 for p in copies)
    # Each copy's nearest training image is itself (PneumoniaMNIST has no duplicates of these six).
    assert [p["nn_pixel"]["train"] for p in copies] == [f"pneumoniamnist_28.npz[train:{i}]" for i in COPIES]
    # Outputs: report, json, config, grids; the untrained feature space is said, not hidden.
    for name in ("audit.md", "audit.json", "config.yaml", "most_realistic.png", "least_realistic.png",
                 "closest_pairs.png"):
        assert (out / name).is_file(), name
    md = (out / "audit.md").read_text()
    assert "feature space is UNTRAINED" in md and "| FID |" in md
    assert json.loads((out / "audit.json").read_text())["backbone"]["untrained"] is True
    assert len(r["per_image"]) == N + len(COPIES) and all(0 <= p["realism"] <= 1 for p in r["per_image"])


def test_noise_is_spotted_with_a_selfsup_export(script, data_root, tmp_path):
    """Uniform noise: AUC ~1, FID far above the real baseline. Backbone: the newest selfsup export."""
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    save_backbone(runs / "pretrain" / "simclr" / "t" / "backbone.safetensors", build_backbone("cbr_tiny", 1, "small"),
                  BackboneMeta(arch="cbr_tiny", in_channels=1, stem="small", image_size=28, method="simclr"))
    noise = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    r = run(script, data_root, tmp_path, write_npz(tmp_path / "noise.npz", noise), f"runs_dir={runs}", "arch=auto")
    assert r["backbone"]["init"] == "simclr" and not r["backbone"]["untrained"]
    assert "UNTRAINED" not in (tmp_path / "audit" / "audit.md").read_text()
    assert r["discriminator"]["auc"] > 0.9
    assert r["distribution"]["fake"]["fid"] > 10 * r["distribution"]["real_baseline"]["fid"]
    assert r["distribution"]["fake"]["precision"] < 0.2
    assert r["memorisation"]["n_flagged"] == 0


def test_heavy_blur_is_spotted(script, real, data_root, tmp_path):
    blurred = TF.gaussian_blur(real["val"], kernel_size=11, sigma=2.5)
    r = run(script, data_root, tmp_path, write_npz(tmp_path / "blur.npz", blurred), "backbone=scratch")
    assert r["discriminator"]["auc"] > 0.9
    assert r["distribution"]["fake"]["fid"] > 5 * r["distribution"]["real_baseline"]["fid"]
    # Smooth images sit close to some training image in pixel space; requiring feature space too keeps
    # them from being called copies.
    assert r["memorisation"]["n_flagged"] <= 3, r["memorisation"]


def test_missing_selfsup_export_fails_clearly(script, data_root, tmp_path):
    fake = write_npz(tmp_path / "x.npz", torch.rand(8, 1, 28, 28))
    from medpretrain.cli import UserError

    # A UserError (cli.run prints it as one line and exits 2) that names the remedy.
    with pytest.raises(UserError, match=r"backbone='selfsup': not available .*backbone=scratch"):
        script.main([f"data.root={data_root}", f"fake={fake}", f"runs_dir={tmp_path / 'empty'}",
                     f"out={tmp_path / 'a'}"])
