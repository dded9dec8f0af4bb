"""Initialisations by name: scratch, ImageNet (generated torchvision-layout files), exports, paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from medpretrain import init as init_mod
from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import BackboneMeta, save_backbone
from medpretrain.config import ConfigError
from medpretrain.init import (
    ImageNetUnavailable,
    WeightsHashMismatch,
    imagenet_file_names,
    init_backbone,
    read_torchvision_state,
)
from medpretrain.utils import sha256_file

torch.set_num_threads(1)
OFFICIAL = "resnet18-f37072fd.pth"


@pytest.fixture(autouse=True)
def _isolated_weight_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real weights can leak in: shared folder, env var and hub cache all point at empty tmp places."""
    monkeypatch.setattr(init_mod, "SHARED_WEIGHTS_DIR", tmp_path / "no_shared_weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(init_mod.ENV_WEIGHTS, raising=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], str]:
    """A torchvision resnet18 state dict (seeded random weights, random BN stats) under the official name."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18(weights=None)
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith(("running_mean", "running_var")):
            v.copy_(torch.rand_like(v) + 0.5)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / OFFICIAL
    torch.save(state, path)
    return path, {k: v.clone() for k, v in state.items()}, sha256_file(path)


def _correctly_named(generated: tuple[Path, dict, str], folder: Path) -> Path:
    path, _, digest = generated
    folder.mkdir(parents=True, exist_ok=True)
    named = folder / f"resnet18-{digest[:8]}.pth"
    shutil.copy(path, named)
    return named


def test_official_file_names() -> None:
    assert imagenet_file_names("resnet18") == [OFFICIAL]
    assert imagenet_file_names("resnet50")[0] == "resnet50-0676ba61.pth"  # IMAGENET1K_V1 preferred
    assert imagenet_file_names("inception_v3") == ["inception_v3_google-0cc3c7bd.pth"]
    with pytest.raises(ValueError, match="no ImageNet weights exist for 'cbr_small'"):
        imagenet_file_names("cbr_small")


def test_scratch_is_seeded_random() -> None:
    torch.manual_seed(5)
    a, info = init_backbone("scratch", "resnet18", 1, "auto", image_size=28)
    torch.manual_seed(5)
    b, _ = init_backbone("scratch", "resnet18", 1, "auto", image_size=28)
    assert (info.name, info.source, info.meta, info.sha256) == ("scratch", "random", None, None)
    assert a.stem == "small"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_official_name_with_wrong_content_fails_hash_check(generated, monkeypatch) -> None:
    path, _, digest = generated
    with pytest.raises(WeightsHashMismatch, match=rf"{OFFICIAL}: sha256 {digest[:16]}\.\.\. does not start with "
                       r"'f37072fd'.*Re-download https://download.pytorch.org/models/resnet18-f37072fd.pth"):
        init_backbone("imagenet", "resnet18", 1, "standard", image_size=64, weights=path)
    monkeypatch.setenv(init_mod.ENV_WEIGHTS, str(path.parent))  # found by folder search too
    with pytest.raises(WeightsHashMismatch, match="does not start with 'f37072fd'"):
        init_backbone("imagenet", "resnet18", 1, "standard", image_size=64)


MU = torch.tensor([0.485, 0.456, 0.406])
SIGMA = torch.tensor([0.229, 0.224, 0.225])


def _stem(weight: torch.Tensor, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet conv1 + bn1 (eval) with ``weight`` and ``state``'s bn1 statistics, written out."""
    y = torch.nn.functional.conv2d(x.double(), weight.double(), stride=2, padding=3)
    rm, rv = state["bn1.running_mean"].double(), state["bn1.running_var"].double()
    g, b = state["bn1.weight"].double(), state["bn1.bias"].double()
    return (y - rm[:, None, None]) / torch.sqrt(rv[:, None, None] + 1e-5) * g[:, None, None] + b[:, None, None]


def test_imagenet_from_env_folder_folds_first_conv(generated, tmp_path, monkeypatch) -> None:
    _, ref, digest = generated
    named = _correctly_named(generated, tmp_path / "w")
    monkeypatch.setenv(init_mod.ENV_WEIGHTS, str(tmp_path / "w"))
    backbone, info = init_backbone("imagenet", "resnet18", 1, "standard", image_size=64)
    sd = backbone.state_dict()
    assert sd["conv1.weight"].shape == (64, 1, 7, 7)
    # Written out: W1 = s * sum_c w_c / sigma_c; bn1's running mean takes k = sum w_c (m - mu_c) / sigma_c.
    w = ref["conv1.weight"].double()
    w1 = 0.5 * (w / SIGMA.double()[None, :, None, None]).sum(1, keepdim=True)
    k = (w * ((0.5 - MU.double()) / SIGMA.double())[None, :, None, None]).sum((1, 2, 3))
    torch.testing.assert_close(sd["conv1.weight"].double(), w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd["bn1.running_mean"].double(), ref["bn1.running_mean"].double() - k, rtol=0, atol=1e-5)
    assert set(sd) == set(ref) - {"fc.weight", "fc.bias"}
    for key in sd:
        if key not in ("conv1.weight", "bn1.running_mean"):
            assert torch.equal(sd[key], ref[key]), key
    assert (info.name, info.source, info.sha256, info.meta) == ("imagenet", str(named), digest, None)
    assert any("input normalisation folded in (grey image summed over RGB; data mean 0.5 std 0.5 -> network mean "
               "0.485/0.456/0.406 std 0.229/0.224/0.225; constant subtracted from bn1.running_mean)" in n
               for n in info.notes), info.notes
    assert any("exact away from the borders only" in n for n in info.notes)
    assert any("not the official file" in n for n in info.notes)
    assert any("pretrained at 224 px, stem standard) runs at 64 px" in n for n in info.notes)
    # A grey image in the project's normalisation through conv1 + bn1 == the grey image copied to RGB in
    # ImageNet's normalisation through the original conv1 + bn1: exact where the 7x7 window avoids the padding.
    torch.manual_seed(0)
    g = torch.rand(2, 1, 40, 40)
    ours = _stem(sd["conv1.weight"], sd, (g - 0.5) / 0.5)
    theirs = _stem(ref["conv1.weight"], ref, (g.repeat(1, 3, 1, 1) - MU[:, None, None]) / SIGMA[:, None, None])
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2], rtol=0, atol=1e-5)
    # ... and not at the border (grey 0.5 padding vs the per-channel ImageNet mean): documented, not hidden.
    assert (ours - theirs)[..., :2, :].abs().max() > 1e-3
    # The old plain sum is not the right kernel: it ignores ImageNet's std (about 2.2x larger inputs).
    assert not torch.allclose(sd["conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True), atol=1e-3)


def test_imagenet_rgb_fold_and_no_silent_crop(generated, tmp_path) -> None:
    _, ref, _ = generated
    named = _correctly_named(generated, tmp_path / "w")
    rgb, info = init_backbone("imagenet", "resnet18", 3, "standard", image_size=224, weights=named)
    expected = ref["conv1.weight"] * (0.5 / SIGMA)[None, :, None, None]
    torch.testing.assert_close(rgb.state_dict()["conv1.weight"], expected, rtol=0, atol=1e-7)
    # Data normalised with ImageNet's own statistics: the fold is the identity and exact on the whole map.
    same, info = init_backbone("imagenet", "resnet18", 3, "standard", image_size=224, weights=named,
                               data_mean=MU.tolist(), data_std=SIGMA.tolist())
    torch.testing.assert_close(same.state_dict()["conv1.weight"], ref["conv1.weight"], rtol=0, atol=1e-7)
    torch.testing.assert_close(same.state_dict()["bn1.running_mean"], ref["bn1.running_mean"], rtol=0, atol=1e-7)
    assert any("exact on the whole map" in n for n in info.notes)
    # The small stem would need a 3x3 crop of the 7x7 kernel: refused unless asked for, and then reported.
    with pytest.raises(ConfigError, match=r"resnet18 ImageNet weights have a 7x7 first kernel, but stem='small' needs "
                       r"3x3 .*backbone\.stem=standard with data\.image_size=64 or 128 .*crop_stem=True"):
        init_backbone("imagenet", "resnet18", 1, "auto", image_size=28, weights=tmp_path / "w")
    small, info = init_backbone("imagenet", "resnet18", 1, "auto", image_size=28, weights=tmp_path / "w",
                                crop_stem=True)
    assert small.stem == "small"
    cropped = ref["conv1.weight"][:, :, 2:5, 2:5].double()
    folded = 0.5 * (cropped / SIGMA.double()[None, :, None, None]).sum(1, keepdim=True)
    torch.testing.assert_close(small.state_dict()["conv1.weight"].double(), folded, rtol=0, atol=1e-6)
    assert torch.equal(small.state_dict()["layer4.1.bn2.running_var"], ref["layer4.1.bn2.running_var"])
    assert any("centre-cropped to 3x3 for the small stem (crop_stem=True" in n for n in info.notes)
    # The standard stem at the small size runs: the size it runs at is reported.
    std28, info = init_backbone("imagenet", "resnet18", 1, "standard", image_size=28, weights=named)
    assert std28.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 512)
    assert any("runs at 28 px" in n for n in info.notes)


def test_hub_cache_and_non_official_name(generated, tmp_path) -> None:
    _, ref, digest = generated
    _correctly_named(generated, tmp_path / "torch_home" / "hub" / "checkpoints")
    b, info = init_backbone("imagenet", "resnet18", 3, "standard", image_size=64)
    assert info.source.startswith(str(tmp_path / "torch_home"))
    assert torch.equal(b.state_dict()["layer1.0.conv1.weight"], ref["layer1.0.conv1.weight"])
    odd = tmp_path / "my_resnet.pth"
    shutil.copy(generated[0], odd)
    b, info = init_backbone("imagenet", "resnet18", 3, "standard", image_size=64, weights=odd)
    assert info.sha256 == digest and any("hash not verified" in n for n in info.notes)


def test_classifier_keys_are_exact(generated, tmp_path) -> None:
    _, ref, _ = generated
    extra = dict(ref, **{"extra.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth: keys do not match.*unexpected \['extra\.weight'\]"):
        init_backbone("imagenet", "resnet18", 3, "standard", image_size=64, weights=tmp_path / "extra.pth")
    headless = {k: v for k, v in ref.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match=r"expected keys \['fc\.bias', 'fc\.weight'\] to be present"):
        init_backbone("imagenet", "resnet18", 3, "standard", image_size=64, weights=tmp_path / "headless.pth")
    torch.save({"state_dict": ref}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"wrapped\.pth: expected a mapping of parameter names to tensors"):
        init_backbone("imagenet", "resnet18", 3, "standard", image_size=64, weights=tmp_path / "wrapped.pth")


def test_missing_weights_raise_and_never_return_a_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(init_mod.ENV_WEIGHTS, str(tmp_path / "nowhere"))
    returned = []
    with pytest.raises(ImageNetUnavailable) as exc:
        returned.append(init_backbone("imagenet", "resnet18", 1, "standard", image_size=64))
    assert returned == []
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert OFFICIAL in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    for place in ("weights argument: not given", str(tmp_path / "nowhere"), str(tmp_path / "no_shared_weights"),
                  str(tmp_path / "torch_home" / "hub" / "checkpoints"), "Not falling back to random"):
        assert place in msg, place


def test_explicit_missing_file_does_not_fall_back(generated, tmp_path, monkeypatch) -> None:
    _correctly_named(generated, tmp_path / "w")
    monkeypatch.setenv(init_mod.ENV_WEIGHTS, str(tmp_path / "w"))  # a valid file exists elsewhere
    with pytest.raises(ImageNetUnavailable, match=r"absent\.pth \(does not exist\)"):
        init_backbone("imagenet", "resnet18", 1, "standard", image_size=64, weights=tmp_path / "absent.pth")


def test_imagenet_not_for_cbr() -> None:
    with pytest.raises(ValueError, match="no ImageNet weights exist for 'cbr_tiny'"):
        init_backbone("imagenet", "cbr_tiny", 1, "small", image_size=28)


def test_densenet_legacy_keys_are_renamed(tmp_path) -> None:
    legacy = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(2),
              "features.denseblock1.denselayer1.conv.2.weight": torch.ones(1), "features.norm5.bias": torch.ones(2)}
    torch.save(legacy, tmp_path / "d.pth")
    assert sorted(read_torchvision_state(tmp_path / "d.pth")) == [
        "features.denseblock1.denselayer1.conv2.weight", "features.denseblock1.denselayer1.norm1.weight",
        "features.norm5.bias"]


# ---------------------------------------------------------------------------------------------------------


def _export(runs: Path, rel: str, method: str, created: str, seed: int, arch: str = "cbr_tiny",
            in_channels: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    b = build_backbone(arch, in_channels, "small")
    meta = BackboneMeta(arch=arch, in_channels=in_channels, stem="small", image_size=28, method=method,
                        created=created)
    path = save_backbone(runs / rel / "backbone.safetensors", b, meta)
    return path, b.state_dict()


def test_selfsup_picks_newest_by_created(tmp_path) -> None:
    runs = tmp_path / "runs"
    # Path order and write order both disagree with `created`, so only `created` can pick the right one.
    newest, newest_sd = _export(runs, "pretrain/simclr/a_run", "simclr", "2026-01-02T00:00:00+00:00", 1)
    _export(runs, "pretrain/simclr/z_run", "simclr", "2026-01-01T00:00:00+00:00", 2)
    _export(runs, "pretrain/moco/m_run", "moco", "2025-12-01T00:00:00+00:00", 3)
    _export(runs, "pretrain/simclr/r50", "simclr", "2026-02-01T00:00:00+00:00", 4, arch="cbr_small")
    b, info = init_backbone("simclr", "cbr_tiny", 1, "auto", image_size=28, runs_dir=runs)
    assert info.source == str(newest) and info.name == "simclr" and info.meta is not None
    assert info.meta.created == "2026-01-02T00:00:00+00:00" and info.sha256 == sha256_file(newest)
    assert all(torch.equal(v, newest_sd[k]) for k, v in b.state_dict().items())
    _, info = init_backbone("selfsup", "cbr_tiny", 1, "auto", image_size=28, runs_dir=runs)
    assert info.source == str(newest)
    # A newer MoCo export (timezone offset +02:00 is 23:30 UTC on the 2nd, later than 00:00) wins `selfsup`.
    moco, _ = _export(runs, "pretrain/moco/n_run", "moco", "2026-01-03T01:30:00+02:00", 5)
    _, info = init_backbone("selfsup", "cbr_tiny", 1, "auto", image_size=28, runs_dir=runs)
    assert info.source == str(moco) and info.name == "moco"
    _, info = init_backbone("moco", "cbr_tiny", 1, "small", image_size=28, runs_dir=runs)
    assert info.source == str(moco)


def test_missing_export_names_the_command(tmp_path) -> None:
    _export(tmp_path / "runs", "pretrain/simclr/x", "simclr", "2026-01-01T00:00:00+00:00", 1, arch="cbr_small")
    with pytest.raises(FileNotFoundError, match=r"no vae backbone export for cbr_tiny.*generative/vae\.py"):
        init_backbone("vae", "cbr_tiny", 1, "auto", image_size=28, runs_dir=tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"no simclr/moco\S* backbone export .*Exports of other architectures: .*cbr_small"):
        init_backbone("selfsup", "cbr_tiny", 1, "auto", image_size=28, runs_dir=tmp_path / "runs")


def test_relative_runs_dir_resolves_against_project_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(init_mod, "PROJECT_ROOT", tmp_path)
    path, _ = _export(tmp_path / "runs", "generative/vae/r", "vae", "2026-01-01T00:00:00+00:00", 1)
    monkeypatch.chdir(tmp_path / "runs")  # the working directory does not matter
    assert init_mod.find_latest_export("runs", ["vae"], "cbr_tiny") == path


def test_path_init_checks_and_adapts_channels(tmp_path) -> None:
    path, ref = _export(tmp_path, "x", "dcgan", "2026-01-01T00:00:00+00:00", 7, in_channels=3)
    b, info = init_backbone(str(path), "cbr_tiny", 1, "auto", image_size=32)
    assert b.in_channels == 1 and info.name == "dcgan"
    assert torch.equal(b.state_dict()["blocks.0.conv.weight"], ref["blocks.0.conv.weight"].sum(1, keepdim=True))
    assert torch.equal(b.state_dict()["blocks.3.bn.weight"], ref["blocks.3.bn.weight"])
    assert any("summed" in n for n in info.notes) and any("used at 32 px" in n for n in info.notes)
    with pytest.raises(ValueError, match=r"backbone\.safetensors: checkpoint holds arch 'cbr_tiny', but arch 'resnet18'"):
        init_backbone(str(path), "resnet18", 1, "auto", image_size=28)
    with pytest.raises(ValueError, match="built with stem='small', but stem='standard' was requested"):
        init_backbone(str(path), "cbr_tiny", 3, "standard", image_size=28)
    one, _ = _export(tmp_path, "y", "vae", "2026-01-01T00:00:00+00:00", 8, in_channels=1)
    with pytest.raises(ValueError, match=r"in_channels=1, but in_channels=3 was requested"):
        init_backbone(str(one), "cbr_tiny", 3, "auto", image_size=28)
    with pytest.raises(FileNotFoundError, match=r"init 'simclrr' is neither one of \['scratch', 'imagenet'"):
        init_backbone("simclrr", "cbr_tiny", 1, "auto", image_size=28)
    with pytest.raises(ValueError, match=r"init 'ddpm': the ddpm stage trains a generator and exports no backbone"):
        init_backbone("ddpm", "cbr_tiny", 1, "auto", image_size=28)
