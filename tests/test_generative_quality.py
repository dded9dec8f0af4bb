"""Generators worth auditing (issue 17): the Radford DCGAN (shapes at 28 / 32 / 64 / 128 px, hinge loss,
spectral norm, two learning rates, the exported trunk's BatchNorm statistics from real images only, fine-tuning
from its export, exact resume) and the VAE's options (KL warm-up, perceptual / SSIM / adversarial terms,
reconstruction PSNR / SSIM, exact resume)."""

from __future__ import annotations

import importlib.util
import json
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
