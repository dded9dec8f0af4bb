"""Pretraining that suits dense tasks (issue 16): random patches at native resolution (``train.patch_size``), the
learning rate as an absolute value (``train.lr_scaling``), and DenseCL (:mod:`medpretrain.methods.densecl`):
shapes on cbr_tiny / ResNet-18 / timm, the dense loss against known answers, the queue checks, and one short
patch run on DRIVE through the shared loop whose export loads into a classifier with exact keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from test_pretrain_e2e import read_csv

from medpretrain import pretrain
from medpretrain.augment import random_patches
from medpretrain.backbones import build_backbone
from medpretrain.config import ConfigError, config_hash, load_config
from medpretrain.methods.base import TrainConfig, method_spec
from medpretrain.methods.densecl import DenseCL, DenseCLConfig, DenseCLMethodConfig, dense_pairs

# --------------------------------------------------------------------------------------------------
# patches and learning rate
# --------------------------------------------------------------------------------------------------


def test_random_patches_are_slices_of_the_source_at_the_drawn_offsets():
    x = torch.randn(3, 2, 33, 34)  # odd sizes, two channels
    patches, corners = random_patches(x, 7, per_image=5, generator=torch.Generator().manual_seed(0))
    assert patches.shape == (15, 2, 7, 7) and corners.shape == (15, 2)
    for n in range(15):
        top, left = corners[n].tolist()
        assert 0 <= top <= 33 - 7 and 0 <= left <= 34 - 7
        assert torch.equal(patches[n], x[n // 5, :, top:top + 7, left:left + 7])  # image n // 5, pixel for pixel
    # Uniform over every position: 2000 draws reach both extremes of both axes.
    _, many = random_patches(x, 7, per_image=700, generator=torch.Generator().manual_seed(1))
    assert (many[:, 0].min(), many[:, 0].max(), many[:, 1].min(), many[:, 1].max()) == (0, 26, 0, 27)
    full, at = random_patches(x, 33, generator=torch.Generator().manual_seed(2))  # as tall as the images
    assert (at[:, 0] == 0).all() and set(at[:, 1].tolist()) <= {0, 1}
    assert all(torch.equal(full[i], x[i, :, :, at[i, 1]:at[i, 1] + 33]) for i in range(3))
    with pytest.raises(ValueError, match="patch size 34 does not fit images of 33x34"):
        random_patches(x, 34)


def test_peak_lr_is_scaled_linearly_or_taken_as_given():
    assert pretrain.peak_lr(TrainConfig(lr=0.06), 9) == pytest.approx(0.06 * 9 / 128, rel=1e-12)
    assert pretrain.peak_lr(TrainConfig(lr=0.06, lr_scaling="linear"), 256) == pytest.approx(0.12, rel=1e-12)
    assert pretrain.peak_lr(TrainConfig(lr=0.003, lr_scaling="none"), 9) == 0.003
    assert pretrain.peak_lr(TrainConfig(lr=0.003, lr_scaling="none"), 4096) == 0.003


def test_new_train_options_check_their_values_and_keep_old_hashes():
    with pytest.raises(ConfigError, match="train.patches_per_image': needs train.patch_size > 0"):
        TrainConfig(patches_per_image=4)
    with pytest.raises(ConfigError, match="train.patch_size': must be >= 0"):
        TrainConfig(patch_size=-1)
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_config(method_spec("simclr").config, ["train.lr_scaling=sqrt"])
    simclr = method_spec("simclr").config
    # At their neutral defaults the new options leave the config hash of every earlier run unchanged.
    base = load_config(simclr, [])
    assert config_hash(base) == config_hash(load_config(simclr, ["train.lr_scaling=linear", "train.patch_size=0"]))
    assert config_hash(base) != config_hash(load_config(simclr, ["train.lr_scaling=none"]))


# --------------------------------------------------------------------------------------------------
# DenseCL
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "stem", "size", "locations"), [
    ("cbr_tiny", "small", 28, 4), ("cbr_tiny", "small", 33, 9), ("resnet18", "small", 30, 16),
    ("resnet18", "standard", 64, 4), ("timm:tf_efficientnet_lite0", "standard", 64, 4)])
def test_densecl_shapes_gradients_and_momentum(arch, stem, size, locations):
    torch.manual_seed(0)
    backbone = build_backbone(arch, 1, stem)
    method = DenseCL(backbone, DenseCLMethodConfig(hidden_dim=32, output_dim=16, queue_size=8, dense_queue_size=64))
    x0, x1 = torch.randn(8, 1, size, size), torch.randn(8, 1, size, size)
    features, g, d = method.query(x0)
    c = backbone.num_features
    assert (features.shape, g.shape, d.shape) == ((8, locations, c), (8, 16), (8, locations, 16))
    # The global branch pools exactly what the contract backbone returns.
    assert torch.allclose(features.mean(dim=1), backbone(x0), atol=1e-5)
    method.before_step(0, 10)
    loss = method(x0, x1)
    assert loss.shape == () and loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))
    loss.backward()
    for name in ("backbone", "projection_head", "dense_head"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(method, name).parameters()), name
    momentum = [p for n, p in method.named_parameters() if n.endswith("_momentum") or "_momentum." in n]
    assert momentum and not any(p.requires_grad or p.grad is not None for p in momentum)
    # lightly's banks take every key of the step: 8 global keys (a full turn of 8), 8 x locations dense ones.
    assert int(method.criterion.memory_bank.bank_ptr) == 0
    assert int(method.dense_criterion.memory_bank.bank_ptr) == (8 * locations if 8 * locations < 64 else 0)


def test_dense_loss_is_lower_for_aligned_than_for_shuffled_correspondences():
    """Keys that are the queries' own vectors at permuted locations: the similarity matching undoes the
    permutation exactly (the loss equals that of the unpermuted keys), and is far below the loss of pairing
    each query with the key at its own position (a wrong correspondence)."""
    torch.manual_seed(0)
    method = DenseCL(build_backbone("cbr_tiny", 1, "small"), DenseCLMethodConfig(queue_size=0, dense_queue_size=0))
    b, n, c = 4, 9, 16
    q_features = torch.randn(b, n, c)
    q_dense = q_features.clone()  # dense projections: the features themselves (identity heads)
    perm = torch.stack([torch.randperm(n) for _ in range(b)])
    k_features = torch.gather(q_features, 1, perm[..., None].expand(-1, -1, c))
    k_dense = k_features.clone()
    # Matching: for each query location, the key location holding the same vector.
    matched = dense_pairs(q_features, k_features, k_dense)
    assert torch.equal(matched, q_dense)
    aligned = float(method.dense_loss(q_features, k_features, q_dense, k_dense))
    assert aligned == pytest.approx(float(method.dense_loss(q_features, q_features, q_dense, q_dense)), abs=1e-6)
    by_position = float(NTXentLoss(temperature=0.2)(q_dense.flatten(end_dim=1), k_dense.flatten(end_dim=1)))
    # Known answer for the aligned pairs: NT-Xent of identical positives over the 2 * 36 vectors.
    z = F.normalize(q_dense.flatten(end_dim=1), dim=1)
    sim = z @ z.T / 0.2
    logits = torch.cat([sim, sim], dim=1)  # [views 0 | views 1]: the positive sits at column i + 36
    logits[torch.arange(36), torch.arange(36)] = -float("inf")  # a sample is not its own negative
    reference = float(F.cross_entropy(logits, torch.arange(36) + 36))
    assert aligned == pytest.approx(reference, abs=1e-5)
    assert aligned < by_position - 1.0, (aligned, by_position)


def test_dense_weight_mixes_the_global_and_dense_losses():
    torch.manual_seed(0)
    x0, x1 = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    losses = {}
    for w in (0.0, 0.3, 1.0):
        torch.manual_seed(1)
        method = DenseCL(build_backbone("cbr_tiny", 1, "small"),
                         DenseCLMethodConfig(queue_size=0, dense_queue_size=0, dense_weight=w, split_bn=False))
        losses[w] = float(method(x0, x1).detach())
    with torch.no_grad():  # the two terms by hand, from the same weights (training mode: batch statistics)
        q_features, q_global, q_dense = method.query(x0)
        k_features, k_global, k_dense = method.key(x1)
        glob = float(method.criterion(q_global, k_global))
        dense = float(method.dense_loss(q_features, k_features, q_dense, k_dense))
    assert losses[0.0] == pytest.approx(glob, abs=1e-5) and losses[1.0] == pytest.approx(dense, abs=1e-5)
    assert losses[0.3] == pytest.approx(0.7 * glob + 0.3 * dense, abs=1e-5)
    assert abs(glob - dense) > 0.1  # the mixture is not trivially one number


def test_densecl_refuses_queues_above_half_the_pretraining_images():
    method = DenseCL(build_backbone("cbr_tiny", 1, "small"), DenseCLMethodConfig(queue_size=9, dense_queue_size=40))
    with pytest.raises(ConfigError, match=r"^densecl.queue_size=9 is not well below the 17 pretraining images: at "
                                          r"most 8 \(half of them\)"):
        method.check_data(17)
    method.check_data(18)  # 9 global keys for 18 images: accepted; the dense queue waits for the map size
    with pytest.raises(ConfigError, match=r"^densecl.dense_queue_size=40 holds the keys of more than half the 18 "
                                          r"pretraining images \(4 locations each\): at most 36"):
        method(torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28))  # cbr_tiny at 28 px: 2x2 locations
    with pytest.raises(ConfigError, match="dense_weight"):
        DenseCLMethodConfig(dense_weight=1.5)


def test_densecl_is_registered_for_the_generic_entry_and_init():
    from medpretrain import init
    from medpretrain.methods import selfsup_methods, stage

    info = stage("densecl")
    assert "densecl" in selfsup_methods() and info.script == "pretrain/train.py"
    assert method_spec("densecl").config is DenseCLConfig and "densecl" in init.NAMED_INITS
    assert init._CREATE_COMMAND["densecl"] == ("python pretrain/train.py method=densecl  "
                                               "(writes runs/pretrain/densecl/<run>/backbone.safetensors)")


@pytest.fixture(scope="module")
def drive_run(tmp_path_factory, data_root):
    """4 DenseCL steps on DRIVE's 18 training images (green + CLAHE, native 565x584): 4 random 64 px patches
    per image, batch 8 images, absolute lr 0.02; the loop's patch sampler is spied on."""
    out = tmp_path_factory.mktemp("densecl")
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def spy(x, size, per_image=1, generator=None):
        patches, corners = random_patches(x, size, per_image, generator)
        seen.append((x.clone(), patches, corners))
        return patches, corners

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "random_patches", spy)
        pretrain.main("densecl", [
            "data.dataset=drive:drive", "data.rgb_to_grey=green", "data.clahe=true", "backbone.arch=cbr_tiny",
            "train.batch_size=8", "train.patch_size=64", "train.patches_per_image=4", "train.lr_scaling=none",
            "train.lr=0.02", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=0", "train.knn_every=-1",
            "densecl.queue_size=0", "densecl.dense_queue_size=0", f"out_dir={out}", "run_name=r"])
    return out / "r", seen


def test_patch_pretraining_draws_native_resolution_patches(drive_run):
    run, seen = drive_run
    assert len(seen) == 4
    for images, patches, corners in seen:
        assert images.shape == (8, 1, 584, 565)  # DRIVE at its native size: no resize before the patches
        assert patches.shape == (32, 1, 64, 64)
        for n in (0, 13, 31):
            top, left = corners[n].tolist()
            assert torch.equal(patches[n], images[n // 4, :, top:top + 64, left:left + 64])
    rows = read_csv(run / "metrics.csv")
    # Absolute lr: the first step runs at train.lr itself (linear scaling would give 0.02 * 32 / 128).
    assert float(rows[0]["lr"]) == pytest.approx(0.02, rel=1e-6) and len(rows) == 4
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_densecl_export_loads_into_a_classifier_with_exact_keys(drive_run, tmp_path):
    import shutil

    from medpretrain.checkpoint import load_backbone, read_meta
    from medpretrain.init import init_backbone

    run, _ = drive_run
    meta = read_meta(run / "backbone.safetensors")
    assert (meta.method, meta.steps, meta.arch, meta.image_size) == ("densecl", 4, "cbr_tiny", 64)
    assert meta.config["train"]["patch_size"] == 64 and meta.config["densecl"]["dense_weight"] == 0.5
    backbone, _ = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    assert set(backbone.state_dict()) == set(build_backbone("cbr_tiny", 1, "small").state_dict())
    classifier = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 2)).eval()
    missing, unexpected = classifier.load_state_dict({**{f"0.{k}": v for k, v in backbone.state_dict().items()},
                                                      "1.weight": torch.zeros(2, 128), "1.bias": torch.zeros(2)})
    assert (missing, unexpected) == ([], [])
    assert classifier(torch.randn(3, 1, 64, 64)).shape == (3, 2)
    dst = tmp_path / "runs" / "pretrain" / "densecl" / "r1" / "backbone.safetensors"
    dst.parent.mkdir(parents=True)
    shutil.copy(run / "backbone.safetensors", dst)
    found, info = init_backbone("densecl", "cbr_tiny", 1, "small", image_size=64, runs_dir=tmp_path / "runs")
    assert info.name == "densecl" and info.source == str(dst)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in found.state_dict().items())
