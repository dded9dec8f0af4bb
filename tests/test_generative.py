"""Generative parts: shapes at 28 / 33 / 64 px, KL and losses against closed forms or naive loops, the
beta schedule, collapse detection, the spectral-norm export, and sample.py's seeded determinism."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import save_state_dict
from medpretrain.generative.dcgan import BackboneDiscriminator, DCGANGenerator, gan_d_loss, gan_g_loss
from medpretrain.generative.ddpm import ddpm_levels
from medpretrain.generative.geometry import upsampling_plan
from medpretrain.generative.monitor import CollapseMonitor, pairwise_diversity, sample_statistics
from medpretrain.generative.sampling import build_generator, generator_meta
from medpretrain.generative.vae import (
    VAE,
    BetaSchedule,
    ConvDecoder,
    PerceptualLoss,
    kl_divergence,
    reconstruction_loss,
)
from medpretrain.images import save_grid, to_uint8

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size,plan", [(28, (7, 2)), (33, (5, 3)), (64, (4, 4)), (128, (4, 5)), (8, (4, 1))])
def test_upsampling_plan(size, plan):
    start, n_up = upsampling_plan(size)
    assert (start, n_up) == plan
    assert start * 2**n_up >= size


@pytest.mark.parametrize("size,levels", [(28, 3), (64, 4), (128, 4), (8, 2), (30, 2)])
def test_ddpm_levels(size, levels):
    assert ddpm_levels(size) == levels
    assert size % 2 ** (levels - 1) == 0


def test_ddpm_levels_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even image size"):
        ddpm_levels(33)


def test_upsampling_plan_rejects_tiny():
    with pytest.raises(ValueError, match="at least 8"):
        upsampling_plan(7)


@pytest.mark.parametrize("size", [28, 33, 64])
def test_generator_shapes_and_range(size):
    torch.manual_seed(0)
    z = torch.randn(3, 16) * 10  # large latents still land in [-1, 1] (tanh)
    for model in (ConvDecoder(16, 1, size, 8), DCGANGenerator(16, 1, size, 8), ConvDecoder(16, 3, size, 8)):
        x = model(z)
        assert x.shape == (3, model.out_channels, size, size)
        assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("size", [28, 64])
def test_vae_and_discriminator_shapes(size):
    torch.manual_seed(0)
    vae = VAE(build_backbone("cbr_tiny", 1, "small"), ConvDecoder(8, 1, size, 8))
    x = torch.rand(2, 1, size, size) * 2 - 1
    out = vae(x)
    assert out.recon.shape == x.shape and out.mu.shape == out.logvar.shape == out.z.shape == (2, 8)
    vae.eval()
    assert torch.equal(vae(x).z, vae(x).mu)  # eval: z = mu, deterministic
    disc = BackboneDiscriminator(build_backbone("cbr_tiny", 1, "small"))
    assert disc(x).shape == (2,)


def test_generator_rejects_bad_latent():
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        DCGANGenerator(16, 1, 28, 8)(torch.randn(2, 15))
    with pytest.raises(ValueError, match="num_features"):
        VAE(torch.nn.Conv2d(1, 1, 1), ConvDecoder(8, 1, 28, 8))


def test_kl_matches_closed_form_and_torch():
    mu = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    # Hand computation: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) per dim, summed, averaged over 2 samples.
    per_dim = [[0.0, 0.5 * (1 + 4 - 1 - math.log(4))], [0.5 * (4 + 0.25 - 1 - math.log(0.25)), 0.5 * 1.0]]
    expected = sum(sum(r) for r in per_dim) / 2
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    reference = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(reference.item(), rel=1e-6)
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0


def test_reconstruction_loss_is_per_sample_sum():
    recon, target = torch.zeros(2, 1, 2, 2), torch.tensor([[[[1.0, 0], [0, 0]]], [[[1.0, 1], [1, -1]]]])
    assert reconstruction_loss(recon, target, "mse").item() == pytest.approx((1 + 4) / 2)
    assert reconstruction_loss(recon, target, "l1").item() == pytest.approx((1 + 4) / 2)
    assert reconstruction_loss(recon, target * 2, "mse").item() == pytest.approx((4 + 16) / 2)
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_loss(recon, target[:1])


def test_beta_schedule_values():
    lin = BetaSchedule("linear", beta=2.0, warmup_steps=10)
    assert [lin(s) for s in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    assert BetaSchedule("linear", beta=0.5, warmup_steps=0)(0) == 0.5
    assert BetaSchedule("constant", beta=0.3)(1000) == 0.3
    cyc = BetaSchedule("cyclical", beta=1.0, cycle_steps=10)
    assert [cyc(s) for s in (0, 1, 5, 7, 9, 10, 12)] == pytest.approx([0.0, 0.2, 1.0, 1.0, 1.0, 0.0, 0.4])
    with pytest.raises(ValueError, match="cycle_steps"):
        BetaSchedule("cyclical", beta=1.0, cycle_steps=0)
    with pytest.raises(ValueError, match="constant, linear or cyclical"):
        BetaSchedule("cosine")  # type: ignore[arg-type]


def test_gan_losses_against_formulas():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    bce_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert gan_d_loss(real, fake, "bce").item() == pytest.approx(bce_d.item(), rel=1e-5)
    assert gan_g_loss(fake, "bce").item() == pytest.approx(-torch.log(sig(fake)).mean().item(), rel=1e-5)
    # hinge: mean(relu(1 - real)) + mean(relu(1 + fake)) = (0 + 1.5)/2 + (1.5 + 0)/2
    assert gan_d_loss(real, fake, "hinge").item() == pytest.approx(1.5)
    assert gan_g_loss(fake, "hinge").item() == pytest.approx(1.25)


def test_pairwise_diversity_against_loop():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 4, 4)
    pairs = [torch.dist(x[i].flatten(), x[j].flatten()) for i, j in itertools.combinations(range(5), 2)]
    assert pairwise_diversity(x) == pytest.approx(float(torch.stack(pairs).mean()) / 4, rel=1e-5)
    assert pairwise_diversity(x[:1].expand(6, -1, -1, -1)) == 0.0
    stats = sample_statistics(x[:1].expand(6, -1, -1, -1) * 2 - 1, x * 2 - 1)
    assert stats["diversity_ratio"] == 0.0 and stats["real_diversity"] > 0.1


def test_collapse_monitor_needs_consecutive_strikes():
    m = CollapseMonitor(threshold=0.2, patience=3)
    assert [m.update(f, 1.0) for f in (0.1, 0.1, 0.5, 0.1, 0.1)] == [False] * 5  # the 0.5 resets the count
    assert m.update(0.05, 1.0) is True
    assert m.last_ratio == pytest.approx(0.05)
    state = m.state_dict()
    m2 = CollapseMonitor(0.2, 3)
    m2.load_state_dict(state)
    assert m2.strikes == 3
    assert CollapseMonitor(0.2, 1).update(float("nan"), 1.0) is True  # NaN samples count as collapse


def test_diversity_ratio_sees_a_class_that_collapsed_in_a_varied_batch():
    """Conditional batch: class 0's fakes are one image, class 1's as varied as its reals. The whole batch
    looks varied (the two classes differ); the within-class ratio is 0, the worst class."""
    from medpretrain.generative.monitor import diversity_ratio

    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 6, 6, generator=g)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    fake = real.clone()
    fake[y == 0] = real[0] + 3.0  # far from class 1's images, and all the same
    assert diversity_ratio(fake, real) > 0.8  # the whole batch: no alarm
    assert diversity_ratio(fake, real, y) == 0.0
    assert diversity_ratio(real, real, y) == pytest.approx(1.0)
    one = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # no class with two images: nothing to compare
    assert math.isnan(diversity_ratio(fake, real, one))
    m = CollapseMonitor(0.2, 2)
    assert [m.update(diversity_ratio(fake, real, y)) for _ in range(2)] == [False, True]


def test_spectral_norm_discriminator_exports_a_plain_backbone():
    torch.manual_seed(0)
    disc = BackboneDiscriminator(build_backbone("cbr_tiny", 1, "small"), spectral_norm=True)
    x = torch.randn(4, 1, 28, 28)
    disc(x).sum().backward()  # trains (power iteration) before export
    disc.eval()
    trunk = disc.export_backbone()
    assert set(trunk.state_dict()) == set(build_backbone("cbr_tiny", 1, "small").state_dict())
    torch.testing.assert_close(trunk(x), disc.backbone(x))
    disc.train()
    disc(x).sum().backward()  # the live discriminator still works after an export


def test_build_generator_roundtrip_and_errors():
    g = DCGANGenerator(12, 1, 33, 8)
    rebuilt = build_generator(generator_meta("dcgan_generator", g, 8))
    rebuilt.load_state_dict(g.state_dict())
    with pytest.raises(ValueError, match="lacks 'latent_dim'"):
        build_generator({"kind": "vae_decoder"})
    with pytest.raises(ValueError, match="generator kind"):
        build_generator({"kind": "gan", "latent_dim": 1, "out_channels": 1, "image_size": 28, "base_channels": 8})


def test_to_uint8_endpoints():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)).flatten().tolist() == [0, 128, 255, 255]


def _load_sample_script():
    spec = importlib.util.spec_from_file_location("gen_sample", ROOT / "generative" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gen_sample"] = module
    spec.loader.exec_module(module)
    return module


def test_sample_script_is_seeded_and_reproducible(tmp_path):
    sample = _load_sample_script()
    torch.manual_seed(0)
    g = DCGANGenerator(10, 1, 28, 8)
    for m in g.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "generator.safetensors"
    save_state_dict(ckpt, g.state_dict(), {**generator_meta("dcgan_generator", g, 8), "method": "dcgan"})

    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        outs.append(sample.main(["--model", str(tmp_path), "--n", "20", "--out", str(tmp_path / name),
                                 "--seed", str(seed), "--batch_size", "7", "--grid", "9"]))
    a, b, c = ((o / "samples.npz").read_bytes() for o in outs)
    assert a == b  # same seed: byte-identical file
    assert a != c
    with np.load(outs[0] / "samples.npz") as npz:
        images = npz["images"]
        assert images.shape == (20, 28, 28) and images.dtype == np.uint8 and int(npz["seed"]) == 3
    assert images.std() > 0
    assert sorted(p.name for p in (outs[0] / "png").iterdir())[:2] == ["sample_00000.png", "sample_00001.png"]
    assert len(list((outs[0] / "png").iterdir())) == 20
    assert (outs[0] / "grid.png").stat().st_size > 0
    # The batch size used to generate must not change the images (BN in eval mode).
    d = sample.main(["--model", str(ckpt), "--n", "20", "--out", str(tmp_path / "d"), "--seed", "3",
                     "--batch_size", "20", "--png", "false"])
    assert (d / "samples.npz").read_bytes() == a
    with pytest.raises(FileNotFoundError, match="generator.safetensors or decoder.safetensors"):
        sample.main(["--model", str(tmp_path / "a"), "--out", str(tmp_path / "e")])


def test_perceptual_loss_is_zero_on_identical_images_and_keeps_extractor_frozen():
    torch.manual_seed(0)
    loss = PerceptualLoss(build_backbone("cbr_tiny", 1, "small")).train()
    assert not loss.features.training  # the extractor stays in eval mode (frozen BN statistics)
    x = torch.rand(2, 1, 28, 28)
    assert loss(x, x).item() == 0.0
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    value = loss(recon, x)
    value.backward()
    assert value.item() > 0 and recon.grad is not None
    assert all(p.grad is None for p in loss.features.parameters())


def test_one_grid_writer_for_both_value_ranges(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    x = torch.rand(5, 1, 7, 9) * 2 - 1  # odd sizes; 5 images -> 3 per row, 2 rows
    a = np.asarray(Image.open(save_grid(x, tmp_path / "a.png")))
    b = np.asarray(Image.open(save_grid((x + 1) / 2, tmp_path / "b.png", value_range=(0, 1))))
    assert a.shape == (2 * (7 + 2) + 2, 3 * (9 + 2) + 2) and np.array_equal(a, b)
    assert a[2:9, 2:11].tolist() == to_uint8(x[0])[0].tolist()  # first image after the 2 px padding
    assert (a[:2] == 255).all() and (a[9:11, 2:11] == 255).all()  # white padding
    rgb = np.asarray(Image.open(save_grid(torch.zeros(2, 3, 8, 8), tmp_path / "c.png", nrow=1)))
    assert rgb.shape == (2 * 10 + 2, 12, 3) and rgb[2, 2].tolist() == [128, 128, 128]
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0]), value_range=(0, 1)).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="no images"):
        save_grid(torch.zeros(0, 1, 8, 8), tmp_path / "d.png")


def test_package_reexports_the_split_modules():
    import medpretrain.generative as gen
    from medpretrain import images
    from medpretrain.generative import dcgan, monitor, vae

    assert gen.VAE is vae.VAE and gen.DCGANGenerator is dcgan.DCGANGenerator
    assert gen.CollapseMonitor is monitor.CollapseMonitor and gen.save_grid is images.save_grid
    assert all(hasattr(gen, name) for name in gen.__all__)


def test_steps_budget_resumable_order_and_per_step_noise(tmp_path):
    from torch.utils.data import DataLoader, RandomSampler

    from medpretrain.generative.configs import VAEConfig
    from medpretrain.generative.stage import Steps, start_generative

    def run(max_steps, resume="", stop_at=None):
        cfg = VAEConfig(out_dir=str(tmp_path), run_name="s")
        cfg.train.max_steps, cfg.train.log_every, cfg.train.checkpoint_every = max_steps, 3, 4
        cfg.train.resume, cfg.train.log_with, cfg.train.seed = resume, "none", 7
        stage = start_generative("t", cfg, ["step", "epoch", "loss", "elapsed_s"])
        gen = torch.Generator()
        loader = DataLoader(list(range(10)), batch_size=2, sampler=RandomSampler(range(10), generator=gen),
                            drop_last=True)
        steps = Steps(stage, cfg.train, loader, gen)
        start = steps.begin()
        seen, noise, logged = [], [], []
        for epoch, batches in steps.epochs():
            for batch in batches:
                seen.append((epoch, batch.tolist()))
                noise.append(torch.rand(2, generator=steps.noise()).tolist())
                steps.advance(torch.tensor(1.0))
                if steps.log_due():
                    logged.append(steps.value)
                    steps.log({"loss": 1.0})
                if steps.after_step() or steps.value == stop_at:
                    break
            if steps.value == stop_at:
                return start, seen, noise, logged, steps
        steps.finish()
        stage.finish()
        return start, seen, noise, logged, steps

    start, seen, noise, logged, steps = run(7)
    assert (start, steps.total, steps.steps_per_epoch, steps.num_epochs, steps.epoch) == (0, 7, 5, 2, 1)
    assert [e for e, _ in seen] == [0] * 5 + [1] * 2 and logged == [3, 6, 7]
    assert sorted(sum((b for e, b in seen if e == 0), [])) == list(range(10))  # one epoch: every item once
    assert len({tuple(n) for n in noise}) == 7  # a different noise draw every step

    # Stopped after step 6 (checkpoint at 4): resumes at step 4, replays the same batches and noise.
    import shutil

    shutil.rmtree(tmp_path / "s")
    run(7, stop_at=6)
    start2, seen2, noise2, _, steps2 = run(7, resume="auto")
    assert start2 == 4 and seen2 == seen[4:] and noise2 == noise[4:] and steps2.value == 7

