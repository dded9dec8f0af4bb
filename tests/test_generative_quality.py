"""Generators worth auditing (issue 17): the Radford DCGAN (shapes at 28 / 32 / 64 / 128 px, hinge loss,
spectral norm, two learning rates, the exported trunk's BatchNorm statistics from real images only, fine-tuning
from its export, exact resume) and the VAE's options (KL warm-up, perceptual / SSIM / adversarial terms,
reconstruction PSNR / SSIM, exact resume)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from medpretrain.checkpoint import CheckpointError, load_backbone, load_backbone_state, load_state_dict
from medpretrain.config import ConfigError, DataConfig, load_config
from medpretrain.data import build_dataset
from medpretrain.generative.configs import DCGANConfig
from medpretrain.generative.dcgan import (
    DCGANGenerator,
    RadfordDiscriminator,
    gan_d_loss,
    gan_g_loss,
    radford_arch,
    reestimate_batchnorm,
)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def load_script(rel: str, name: str) -> Any:
    """An entry script as a fresh module (scripts are not in the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_images(n: int) -> torch.Tensor:
    """The first ``n`` PneumoniaMNIST training images in [-1, 1], ``[n, 1, 28, 28]``."""
    ds = build_dataset(DataConfig(), "train", unlabeled=True)
    return torch.stack([ds[i]["image"] for i in range(n)])


# --------------------------------------------------------------------------------------------------
# DCGAN: architecture and losses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,arch,start", [(28, "dcgan_d2", 7), (32, "dcgan_d3", 4), (64, "dcgan_d4", 4),
                                             (128, "dcgan_d5", 4)])
def test_radford_generator_and_discriminator_are_mirrors_sized_to_the_image(size, arch, start):
    torch.manual_seed(0)
    g, d = DCGANGenerator(100, 1, size, 64), RadfordDiscriminator(1, size)
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for m in g.net if isinstance(m, nn.ConvTranspose2d)]
    x = g(torch.randn(2, 100))
    for h in hooks:
        h.remove()
    assert x.shape == (2, 1, size, size) and x.min() >= -1 and x.max() <= 1
    n_up = len(shapes) - 1
    # z -> start x start, then every transposed conv doubles the size (28 = 7 * 4: no crop) and halves channels
    assert [s[1] for s in shapes] == [start * 2**i for i in range(n_up + 1)] and shapes[-1] == (1, size, size)
    g_channels = [s[0] for s in shapes[:-1]]
    assert g_channels == [min(512, 64 * 2**i) for i in reversed(range(n_up))]
    kinds = [type(m) for m in g.net]
    assert kinds.count(nn.BatchNorm2d) == n_up and kinds.count(nn.ReLU) == n_up and kinds[-1] is nn.Tanh
    assert kinds[-2] is nn.ConvTranspose2d  # no BatchNorm on the output layer (the paper)

    assert d.backbone.arch == arch == radford_arch(size)
    maps = d.backbone.forward_features(x)
    assert [m.shape[1] for m in maps] == g_channels[::-1]  # D mirrors G
    assert [m.shape[-1] for m in maps] == [size // 2 ** (i + 1) for i in range(n_up)] and maps[-1].shape[-1] == start
    blocks = list(d.backbone.blocks)
    assert not hasattr(blocks[0], "bn") and all(isinstance(b.bn, nn.BatchNorm2d) for b in blocks[1:])
    assert all(isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.2 for b in blocks)
    assert all(b.conv.kernel_size == (4, 4) and b.conv.stride == (2, 2) for b in blocks)
    assert d.head.kernel_size == (start, start)  # the paper's last conv covers the whole last map
    assert d(x).shape == (2,)
    with pytest.raises(ValueError, match=f"built for {size} px"):
        d(torch.zeros(2, 1, size + 4, size + 4))


def test_radford_arch_limits():
    assert [radford_arch(s) for s in (8, 16, 33, 256)] == ["dcgan_d1", "dcgan_d2", "dcgan_d3", "dcgan_d6"]
    with pytest.raises(ConfigError, match="8 to 511 px.*discriminator=backbone"):
        radford_arch(512)


def test_hinge_loss_on_known_logits_against_a_loop():
    real = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    d_ref = sum(max(0.0, 1 - r) for r in (2.0, 0.5, -1.0)) / 3 + sum(max(0.0, 1 + f) for f in (-2.0, 0.0, 1.5)) / 3
    loss = gan_d_loss(real, fake, "hinge")
    assert loss.item() == pytest.approx(d_ref) and d_ref == pytest.approx(2.0)
    loss.backward()
    # beyond the margin (real 2 > 1, fake -2 < -1) a logit gets no gradient; inside it -1/3 or +1/3
    assert real.grad.tolist() == pytest.approx([0.0, -1 / 3, -1 / 3])
    assert fake.grad.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])
    assert gan_g_loss(fake, "hinge").item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_spectral_norm_bounds_every_discriminator_layer_to_unit_largest_singular_value():
    torch.manual_seed(0)
    d = RadfordDiscriminator(1, 32, spectral_norm=True)
    x = torch.randn(4, 1, 32, 32)
    for _ in range(3):  # power iterations happen in training forwards
        d(x).sum().backward()
    d.eval()
    layers = [(n, m) for n, m in d.named_modules() if parametrize.is_parametrized(m, "weight")]
    assert [n for n, _ in layers] == ["backbone.blocks.0.conv", "backbone.blocks.1.conv", "backbone.blocks.2.conv",
                                      "head"]
    for name, m in layers:
        w, raw = m.weight, m.parametrizations.weight.original
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        raw_sigma = torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.03), name
        assert abs(raw_sigma - 1.0) > 0.1, name  # the unnormalised weight is not already at 1
    trunk = d.export_backbone()  # plain weights with the normalised values
    for k, v in trunk.state_dict().items():
        if k.endswith("conv.weight"):
            assert torch.linalg.matrix_norm(v.reshape(v.shape[0], -1), ord=2).item() == pytest.approx(1.0, abs=0.03)
    assert not any(parametrize.is_parametrized(m) for m in trunk.modules())


def test_two_learning_rates_reach_the_two_optimisers():
    script = load_script("generative/dcgan.py", "quality_dcgan_lr")
    cfg = load_config(DCGANConfig, ["train.lr=1e-4", "d_lr=4e-4"], defaults_file=script.DEFAULTS)
    assert cfg.discriminator == "radford" and cfg.loss == "bce" and not cfg.spectral_norm  # the paper by default
    g, d = script.build_models(cfg, 1, 28)
    assert isinstance(d, RadfordDiscriminator)
    opt_g, opt_d = script.build_optimizers(cfg, g, d)
    assert [grp["lr"] for grp in opt_g.param_groups] == [1e-4] and [grp["lr"] for grp in opt_d.param_groups] == [4e-4]
    assert {id(p) for p in opt_g.param_groups[0]["params"]} == {id(p) for p in g.parameters()}
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {id(p) for p in d.parameters()}
    assert opt_g.param_groups[0]["betas"] == opt_d.param_groups[0]["betas"] == (0.5, 0.999)
    same = load_config(DCGANConfig, ["train.lr=3e-4"], defaults_file=script.DEFAULTS)
    assert [o.param_groups[0]["lr"] for o in script.build_optimizers(same, g, d)] == [3e-4, 3e-4]  # d_lr=0
    with pytest.raises(ConfigError, match="d_lr"):
        load_config(DCGANConfig, ["d_lr=-1"], defaults_file=script.DEFAULTS)


# --------------------------------------------------------------------------------------------------
# DCGAN: BatchNorm statistics of the exported trunk
# --------------------------------------------------------------------------------------------------


def bn_reference(trunk: nn.Module, real: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the running statistics of ``dcgan_d2``'s only BatchNorm (``blocks.1.bn``) must be after a pass
    over ``real`` in batches of ``batch`` with momentum None: the mean over all images of its input (equal
    batches) and the mean of the per-batch unbiased variances."""
    with torch.no_grad():
        h = trunk.blocks[1].conv(trunk.blocks[0](real.clone()))
    var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for b in h.split(batch)]).mean(0)
    return h.mean(dim=(0, 2, 3)), var


def test_reestimate_batchnorm_keeps_real_statistics_only():
    torch.manual_seed(0)
    d = RadfordDiscriminator(1, 28).train()
    real = torch.rand(48, 1, 28, 28) * 0.2 - 0.9  # dark
    fake = torch.rand(96, 1, 28, 28) * 0.2 + 0.7  # bright: very different statistics
    with torch.no_grad():  # as in the loop: D sees real and fake batches separately, more fakes than reals
        for r, f in zip(real.split(16), fake.split(32), strict=True):
            d(r), d(f[:16]), d(f[16:])
    trunk = d.export_backbone()
    bn = trunk.blocks[1].bn
    mixed_mean, mixed_var = bn.running_mean.clone(), bn.running_var.clone()
    weights = {k: v.clone() for k, v in trunk.named_parameters()}
    assert reestimate_batchnorm(trunk, [*real.split(16), real[:1]]) == 48  # the one-image batch is skipped
    ref_mean, ref_var = bn_reference(trunk, real, 16)
    torch.testing.assert_close(bn.running_mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_var, rtol=1e-5, atol=1e-6)
    assert (mixed_mean - ref_mean).abs().max() > 0.05 and (mixed_var / ref_var).max() > 2  # fakes were in there
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1 and not trunk.training and not bn.training
    assert all(torch.equal(v, weights[k]) for k, v in trunk.named_parameters())
    with pytest.raises(ValueError, match="no batch of at least two images"):
        reestimate_batchnorm(trunk, [real[:1]])
    torch.testing.assert_close(bn.running_mean, ref_mean, rtol=1e-5, atol=1e-6)  # left as they were


DCGAN_TINY = ["train.batch_size=16", "train.log_every=1", "train.grid_size=4", "train.log_with=none",
              "train.checkpoint_every=2", "collapse_check_every=2", "on_collapse=warn", "export_bn_images=48",
              "train.lr=1e-4", "d_lr=4e-4"]


def run_dcgan(out: Path, name: str, steps: int, *extra: str) -> tuple[Any, dict[str, Any]]:
    """generative/dcgan.py in process; returns (the live discriminator after training, results)."""
    script = load_script("generative/dcgan.py", f"quality_dcgan_{name}_{steps}")
    captured: dict[str, Any] = {}
    real_build = script.build_models

    def build(*args: Any) -> Any:
        captured["models"] = real_build(*args)
        return captured["models"]

    script.build_models = build
    results = script.main([*DCGAN_TINY, f"train.max_steps={steps}", f"out_dir={out}", f"run_name={name}", *extra])
    return captured["models"][1], results


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("dcgan_quality")
    disc, results = run_dcgan(out, "r", 4)
    return out, disc, results


def test_dcgan_export_declares_a_buildable_trunk_with_real_only_bn_statistics(dcgan_run):
    out, disc, results = dcgan_run
    run = out / "r"
    trunk, meta = load_backbone(run / "backbone.safetensors", arch="dcgan_d2", in_channels=1)
    assert (meta.method, meta.arch, meta.image_size, meta.steps) == ("dcgan", "dcgan_d2", 28, 4)
    assert meta.extra["discriminator"] == "radford" and meta.extra["bn_images"] == 48
    assert "real training images" in meta.extra["bn_statistics"] and results["discriminator_arch"] == "dcgan_d2"
    # The exported statistics are those of the first 48 real training images, in batches of 16 ...
    ref_mean, ref_var = bn_reference(trunk, train_images(48), 16)
    bn = trunk.blocks[1].bn
    torch.testing.assert_close(bn.running_mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_var, rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3
    # ... not the live discriminator's, which mixed real and generated batches, and the weights are D's
    live = disc.backbone.blocks[1].bn
    assert (live.running_mean - ref_mean).abs().max() > 10 * (1e-5 + 1e-4 * ref_mean.abs().max())
    live_weights = disc.export_backbone().state_dict()
    assert all(torch.equal(v, live_weights[k]) for k, v in trunk.state_dict().items() if "running" not in k
               and "num_batches" not in k)


def test_dcgan_learning_rates_are_in_the_checkpointed_optimisers(dcgan_run):
    out, _, _ = dcgan_run
    ckpt = max((out / "r" / "checkpoints").iterdir())
    lrs = [torch.load(ckpt / f, weights_only=True)["param_groups"][0]["lr"] for f in ("optimizer.bin", "optimizer_1.bin")]
    assert lrs == [1e-4, 4e-4]  # G, then D (the order they are prepared in)


def test_finetune_runs_from_a_dcgan_export(dcgan_run, tmp_path):
    from medpretrain.finetune import main_in_process

    out, _, _ = dcgan_run
    export = out / "r" / "backbone.safetensors"
    ft = tmp_path / "ft"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), f"init={export}", "backbone.arch=dcgan_d2",
                            "optim.steps=0", "optim.epochs=1", "optim.max_steps_per_epoch=2", "optim.batch_size=32",
                            "optim.eval_batch_size=512", "n_bootstrap=10", "data.label_fraction=0.05",
                            f"output_dir={ft}"])
    assert code == 0
    res = json.loads((ft / "results.json").read_text())
    assert res["status"] == "complete" and res["init_info"]["name"] == "dcgan"
    assert res["init_info"]["source"] == str(export) and res["init_info"]["meta"]["arch"] == "dcgan_d2"
    assert 0.0 <= res["metrics"]["test"]["auc"] <= 1.0
    # the resnet18 default cannot take it: one clear line naming the arch
    with pytest.raises(CheckpointError, match="holds arch 'dcgan_d2', but arch 'resnet18' was requested"):
        main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), f"init={export}", "optim.steps=0",
                         "optim.epochs=1", "optim.max_steps_per_epoch=1", f"output_dir={tmp_path / 'bad'}"])


def test_dcgan_resumes_exactly(dcgan_run):
    """Two steps, then the budget raised to four and resumed from the step-2 checkpoint: the same weights
    (generator, exported trunk and its statistics) and the same logged losses as four steps straight."""
    out, _, _ = dcgan_run
    run_dcgan(out, "part", 2)
    run_dcgan(out, "part", 4, "train.resume=auto")
    for name, read in (("generator.safetensors", load_state_dict), ("backbone.safetensors", load_backbone_state)):
        a, _ = read(out / "part" / name)
        b, _ = read(out / "r" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def rows(run: Path) -> list[list[str]]:
        lines = (run / "metrics.csv").read_text().splitlines()
        return [line.split(",")[:-1] for line in lines]  # every column but the wall time

    assert rows(out / "part") == rows(out / "r") and len(rows(out / "r")) == 5


# --------------------------------------------------------------------------------------------------
# VAE: KL warm-up, PSNR / SSIM, the patch discriminator, prior samples
# --------------------------------------------------------------------------------------------------


def test_kl_warmup_weight_is_linear_over_the_configured_steps():
    from medpretrain.generative.configs import VAEConfig
    from medpretrain.generative.vae import BetaSchedule

    warm = BetaSchedule("linear", beta=1.0, warmup_steps=4)
    assert [warm(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [BetaSchedule("linear", beta=0.5, warmup_steps=8)(s) for s in (2, 6, 100)] == [0.125, 0.375, 0.5]
    cfg = load_config(VAEConfig, ["kl_warmup_steps=7"], defaults_file=ROOT / "configs" / "vae.yaml")
    assert cfg.beta_warmup_steps == 7 and cfg.beta_schedule == "linear"
    with pytest.raises(ConfigError, match="beta_warmup_steps=-1"):
        load_config(VAEConfig, ["kl_warmup_steps=-1"])


def naive_ssim(a: torch.Tensor, b: torch.Tensor, k: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 by a loop over every k x k window inside one [H, W] image pair."""
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    w = (g[:, None] * g[None, :]) / g.sum() ** 2
    a, b = a.double(), b.double()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(a.shape[0] - k + 1):
        for j in range(a.shape[1] - k + 1):
            pa, pb = a[i:i + k, j:j + k], b[i:i + k, j:j + k]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb, cab = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2, (w * pa * pb).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(values).mean())


def test_psnr_and_ssim_of_identical_and_known_perturbed_images():
    from medpretrain.generative.monitor import psnr, ssim

    torch.manual_seed(0)
    x = torch.rand(3, 2, 16, 17) * 0.6 + 0.2
    assert torch.isinf(psnr(x, x)).all() and psnr(x, x).gt(0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # a constant offset of 0.1: MSE 0.01 -> 20 dB exactly
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((3,), 20.0), rtol=1e-5, atol=1e-4)
    in_pm1 = x * 2 - 1  # the same offset on the [-1, 1] scale: 0.2 with data_range 2
    torch.testing.assert_close(psnr(in_pm1 + 0.2, in_pm1, data_range=2.0), torch.full((3,), 20.0), rtol=1e-5, atol=1e-4)
    # flat images 0.5 vs 0.6: structure and contrast terms are 1, luminance (2 m n + C1) / (m^2 + n^2 + C1)
    flat = torch.full((1, 1, 12, 12), 0.5)
    assert ssim(flat + 0.1, flat).item() == pytest.approx((2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4), abs=1e-5)
    # noisy pair: the mean over channels of the windowed loop
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    got = ssim(noisy, x)
    ref = [sum(naive_ssim(noisy[i, c], x[i, c]) for c in range(2)) / 2 for i in range(3)]
    assert got.tolist() == pytest.approx(ref, abs=1e-5) and max(ref) < 0.95
    assert ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)).shape == (2,)  # 7x7 window below 11 px
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim(x, x[:, :1])


@pytest.mark.parametrize("size,layers,logits", [(28, 2, 5), (32, 2, 6), (64, 3, 6), (28, 1, 12)])
def test_patch_discriminator_shapes_and_spectral_norm(size, layers, logits):
    from medpretrain.generative.vae import PatchDiscriminator

    torch.manual_seed(0)
    d = PatchDiscriminator(1, 16, layers)
    x = torch.randn(3, 1, size, size)
    d(x).sum().backward()
    assert d(x).shape == (3, 1, logits, logits)
    d.eval()
    convs = [m for m in d.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(convs) == layers + 2
    for m in convs:
        w = m.weight
        assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match=f">= {4 * 2**layers}"):
        d(torch.zeros(1, 1, 4 * 2**layers - 1, 4 * 2**layers - 1))


def test_vae_prior_samples_share_the_decoder_pass():
    from medpretrain.backbones import build_backbone
    from medpretrain.generative.vae import VAE, ConvDecoder

    torch.manual_seed(0)
    vae = VAE(build_backbone("cbr_tiny", 1, "small"), ConvDecoder(8, 1, 28, 8))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    plain = vae(x, generator=torch.Generator().manual_seed(1))
    both = vae(x, generator=torch.Generator().manual_seed(1), n_prior=3)
    assert plain.prior is None and both.prior.shape == (3, 1, 28, 28)
    assert torch.equal(plain.z, both.z)  # the posterior noise is drawn first, from the same generator
    vae.eval()  # with BatchNorm in eval mode the reconstructions do not depend on the prior batch
    out = vae(x, generator=torch.Generator().manual_seed(2), n_prior=5)
    torch.testing.assert_close(vae(x).recon, out.recon)
    # eval: z = mu draws nothing, so the prior latents are the generator's first draw, decoded
    torch.testing.assert_close(out.prior, vae.decoder(torch.randn(5, 8, generator=torch.Generator().manual_seed(2))))


# --------------------------------------------------------------------------------------------------
# VAE: a run with every option, its reported numbers, exact resume
# --------------------------------------------------------------------------------------------------

VAE_TINY = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.log_every=1", "train.grid_size=4",
            "train.log_with=none", "train.checkpoint_every=2", "kl_warmup_steps=3", "perceptual_weight=0.05",
            "ssim_weight=0.1", "adversarial_weight=0.02", "adversarial_start=1", "adversarial_lr=5e-4",
            "adversarial_channels=16"]


def run_vae(out: Path, name: str, steps: int, *extra: str) -> tuple[Any, dict[str, Any]]:
    """generative/vae.py in process; returns (the perceptual loss module it built, results)."""
    script = load_script("generative/vae.py", f"quality_vae_{name}_{steps}")
    captured: dict[str, Any] = {}
    real_build = script.build_perceptual

    def build(*args: Any) -> Any:
        captured["perceptual"] = real_build(*args)
        captured["initial"] = copy.deepcopy(captured["perceptual"].state_dict())
        return captured["perceptual"]

    script.build_perceptual = build
    results = script.main([*VAE_TINY, f"train.max_steps={steps}", f"out_dir={out}", f"run_name={name}", *extra])
    return captured, results


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("vae_quality")
    captured, results = run_vae(out, "r", 4)
    return out, captured, results


def metrics_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_vae_reports_psnr_and_ssim_and_logs_every_term(vae_run):
    out, _, results = vae_run
    run = out / "r"
    assert results["val_psnr"] == pytest.approx(10 * math.log10(1 / results["val_mse"]), rel=1e-9)
    assert 0.0 < results["val_ssim"] < 1.0 and results["val_psnr"] > 5
    _, meta = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    assert {k: meta.extra[k] for k in ("val_mse", "val_psnr", "val_ssim")} == \
        {k: results[k] for k in ("val_mse", "val_psnr", "val_ssim")}
    assert json.loads((run / "results.json").read_text())["val_ssim"] == results["val_ssim"]
    rows = metrics_rows(run)
    steps = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
    # KL warm-up over 3 steps: the weight of step s is beta(s - 1)
    assert [float(r["beta"]) for r in steps] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert all(r["perceptual"] and r["ssim"] for r in steps)
    assert [bool(r["adv_g"]) for r in steps] == [False, True, True, True]  # adversarial_start=1
    assert all(0 < float(r["ssim"]) < 1 and float(r["adv_d"]) > 0 for r in steps[1:])
    [val] = [r for r in rows if r["val_ssim"]]
    assert float(val["val_ssim"]) == pytest.approx(results["val_ssim"], rel=1e-5)


def test_vae_perceptual_network_is_frozen_with_real_statistics(vae_run):
    _, captured, _ = vae_run
    features = captured["perceptual"].features
    assert not features.training and not any(p.requires_grad for p in features.parameters())
    after = captured["perceptual"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in captured["initial"].items())  # not trained, stats not moved
    bn = features.blocks[0].bn
    assert int(bn.num_batches_tracked) == 64  # 1024 real images in batches of 16
    assert bn.running_mean.abs().max() > 0.01 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_vae_discriminator_and_its_optimiser_are_checkpointed(vae_run):
    out, _, _ = vae_run
    ckpt = max((out / "r" / "checkpoints").iterdir())
    assert torch.load(ckpt / "optimizer_1.bin", weights_only=True)["param_groups"][0]["lr"] == 5e-4
    from safetensors.torch import load_file

    disc = load_file(str(ckpt / "model_1.safetensors"))
    assert any(k.endswith("parametrizations.weight.original") for k in disc)


def test_vae_with_every_option_resumes_exactly(vae_run):
    out, _, _ = vae_run
    run_vae(out, "part", 2)
    run_vae(out, "part", 4, "train.resume=auto")
    for name, read in (("decoder.safetensors", load_state_dict), ("backbone.safetensors", load_backbone_state)):
        a, _ = read(out / "part" / name)
        b, _ = read(out / "r" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def losses(run: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in metrics_rows(run) if r["loss"]]

    assert losses(out / "part") == losses(out / "r") and len(losses(out / "r")) == 4


def test_vae_evaluate_reports_psnr_of_the_mean_mse_and_mean_ssim():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from medpretrain.config import BackboneConfig
    from medpretrain.generative.configs import VAEConfig
    from medpretrain.generative.monitor import ssim

    script = load_script("generative/vae.py", "quality_vae_eval")

    torch.manual_seed(0)
    model = script.build_model(VAEConfig(backbone=BackboneConfig(arch="cbr_tiny")), 1, 28)
    x = train_images(10)
    val = script.evaluate(model, DataLoader([{"image": im} for im in x], batch_size=4), Accelerator(cpu=True))
    assert model.training  # evaluate puts the model back in training mode
    with torch.no_grad():
        r01, x01 = (model.eval()(x).recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2
    mse = float((r01 - x01).pow(2).mean())
    assert val["val_mse"] == pytest.approx(mse, rel=1e-5)
    assert val["val_psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert val["val_ssim"] == pytest.approx(float(ssim(r01, x01).mean()), rel=1e-5) and val["val_ssim"] < 0.9
