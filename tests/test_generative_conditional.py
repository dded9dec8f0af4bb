"""Class-conditional generation (issue 17): ``conditional=true`` for the VAE, the DCGAN (both discriminators)
and the DDPM on PneumoniaMNIST's two classes at 28 px, a few steps each, in process.

The parts against hand-computed references (the class embedding concatenated to z, the projection term
<embed(y), pooled features> of Miyato & Koyama 2018, the conditional VAE's prior pass), the training labels
following their images, the exports' metadata (``num_classes``, ``class_names``), ``generative/sample.py
per_class=<n>`` (exactly n per class, ``labels`` and a unicode ``class_names`` in ``samples.npz``, byte-identical
for a seed, a class's samples independent of the other classes requested, different images per class from the
same latents), an exact resume of a conditional DCGAN, and the one-line refusals (a source without single
labels, ``per_class`` for an unconditional model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils import parametrize

from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import load_backbone, load_backbone_state, load_state_dict, save_state_dict
from medpretrain.config import ConfigError, DataConfig, config_hash, hash_view
from medpretrain.data import build_dataset
from medpretrain.generative.conditioning import class_seed, grid_labels
from medpretrain.generative.configs import DCGANConfig, DDPMConfig, VAEConfig
from medpretrain.generative.dcgan import BackboneDiscriminator, DCGANGenerator, RadfordDiscriminator
from medpretrain.generative.ddpm import ddpm_sample
from medpretrain.generative.sampling import (
    build_generator,
    generate,
    generator_meta,
    latent_noise,
    sample_classes,
)
from medpretrain.generative.stage import TrainData, class_labels
from medpretrain.generative.vae import VAE, ConvDecoder
from medpretrain.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["normal", "pneumonia"]
torch.set_num_threads(1)

COND = ["conditional=true", "train.batch_size=16", "train.log_every=1", "train.grid_size=4", "train.log_with=none",
        "train.checkpoint_every=2"]
DCGAN_TINY = [*COND, "latent_dim=16", "generator_channels=16", "export_bn_images=32", "collapse_check_every=0"]
VAE_TINY = [*COND, "backbone.arch=cbr_tiny", "latent_dim=8", "decoder_channels=8", "kl_warmup_steps=2"]
DDPM_TINY = [*COND, "base_channels=8", "sample_steps=2", "class_dropout=0.25", "guidance_scale=2.0"]


def load_script(rel: str, name: str) -> Any:
    """An entry script as a fresh module (scripts are not in the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (sample.py's config) resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def run_script(rel: str, args: list[str]) -> dict[str, Any]:
    return load_script(rel, f"cond_{Path(rel).stem}").main(args)


def sample(args: list[str]) -> Path:
    return load_script("generative/sample.py", "cond_sample").main(args)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


def test_proportional_split_by_largest_remainders_keeps_every_class() -> None:
    split = load_script("generative/sample.py", "cond_sample").proportional
    assert split(1000, [388, 3494]) == [100, 900]  # PneumoniaMNIST's training mix: 99.95 / 900.05
    assert split(10, [388, 3494]) == [1, 9]
    assert split(7, [1, 1, 1]) == [3, 2, 2]  # ties: the earlier class
    assert split(3, [1, 1000, 1]) == [1, 1, 1]  # a rare class keeps one sample
    assert split(5, [0, 3, 1]) == [0, 4, 1]
    assert sum(split(999, [5, 7, 11, 13])) == 999


def test_class_seed_depends_on_the_seed_and_the_class_only() -> None:
    seeds = {(s, c): class_seed(s, c) for s in (0, 1, 7) for c in (0, 1, 2)}
    assert len(set(seeds.values())) == 9 and all(0 <= v < 2**63 for v in seeds.values())
    assert class_seed(7, 2) == seeds[(7, 2)]  # a pure function of (seed, class)
    assert torch.equal(grid_labels(5, 2), torch.tensor([0, 1, 0, 1, 0])) and grid_labels(5, 0) is None
    with pytest.raises(ValueError, match=">= 0"):
        class_seed(-1, 0)


def test_the_new_options_are_hash_neutral_and_checked() -> None:
    """Finished unconditional runs keep their hashes; conditional ones get their own."""
    for cls in (VAEConfig, DCGANConfig, DDPMConfig):
        assert "conditional" not in hash_view(cls()) and config_hash(cls()) != config_hash(cls(conditional=True))
    assert not {"class_dropout", "guidance_scale"} & set(hash_view(DDPMConfig()))
    with pytest.raises(ConfigError, match="^class_dropout and guidance_scale need conditional=true$"):
        DDPMConfig(class_dropout=0.1)
    with pytest.raises(ConfigError, match="needs class_dropout > 0"):
        DDPMConfig(conditional=True, guidance_scale=2.0)


def test_generator_and_decoder_concatenate_the_class_embedding_to_z() -> None:
    torch.manual_seed(0)
    g = DCGANGenerator(8, 1, 28, 8, num_classes=3).eval()
    assert g.net[0].in_channels == 16 and g.class_embed.weight.shape == (3, 8)  # class_dim = latent_dim
    z, y = torch.randn(4, 8), torch.tensor([0, 2, 1, 2])
    by_hand = g.net(torch.cat([z, g.class_embed.weight[y]], 1)[:, :, None, None])
    torch.testing.assert_close(g(z, y), by_hand, rtol=0, atol=0)
    x0 = g(z, torch.zeros(4, dtype=torch.int64))
    assert (x0 - g(z, torch.full((4,), 2))).abs().mean() > 0.1 * x0.abs().mean()  # (untrained: outputs ~1e-4)
    with pytest.raises(ValueError, match="class-conditional \\(3 classes\\): pass class labels"):
        g(z)
    with pytest.raises(ValueError, match="unconditional"):
        DCGANGenerator(8, 1, 28, 8)(z, y)
    with pytest.raises(ValueError, match="at least 2"):
        DCGANGenerator(8, 1, 28, 8, num_classes=1)

    dec = ConvDecoder(8, 1, 28, 8, num_classes=3, class_dim=5).eval()
    assert dec.fc.in_features == 13
    h = F.silu(dec.fc(torch.cat([z, dec.class_embed.weight[y]], 1))).view(4, dec.start_channels, dec.start, dec.start)
    torch.testing.assert_close(dec(z, y), torch.tanh(dec.to_image(dec.blocks(h))), rtol=0, atol=0)


def test_conditional_vae_feeds_the_class_to_encoder_head_and_decoder() -> None:
    torch.manual_seed(0)
    encoder = build_backbone("cbr_tiny", 1, "small", image_size=28)
    vae = VAE(encoder, ConvDecoder(8, 1, 28, 8, num_classes=2)).eval()
    assert vae.head.mu.in_features == encoder.num_features + 8 and vae.class_embed.weight.shape == (2, 8)
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 0, 1])
    mu, _ = vae.encode(x, y)
    torch.testing.assert_close(mu, vae.head.mu(torch.cat([encoder(x), vae.class_embed(y)], 1)))
    assert not torch.allclose(vae.encode(x, 1 - y)[0], mu)  # q(z | x, y) depends on y
    # eval: z = mu, so the prior draws come first from the generator, decoded with the first n_prior labels
    out = vae(x, generator=torch.Generator().manual_seed(5), n_prior=2, y=y)
    z_prior = torch.randn((2, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.prior, vae.decoder(z_prior, y[:2]))
    torch.testing.assert_close(out.recon, vae.decoder(mu, y))


@pytest.mark.parametrize("kind", ["radford", "backbone"])
def test_projection_discriminator_adds_the_inner_product_of_class_embedding_and_pooled_features(kind: str) -> None:
    """Miyato & Koyama 2018, eq. 3: logit(x, y) = head(h(x)) + <embed(y), h(x)> with h the pooled trunk features."""
    torch.manual_seed(0)
    if kind == "radford":
        d = RadfordDiscriminator(1, 28, num_classes=2)
    else:
        d = BackboneDiscriminator(build_backbone("cbr_tiny", 1, "small", image_size=28), num_classes=2)
    d.eval()
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1])
    pooled = d.backbone(x)  # the trunk's pooled output (Radford: the global mean of its last map)
    if kind == "radford":
        torch.testing.assert_close(pooled, d.backbone.forward_features(x)[-1].mean((2, 3)))
        plain = d.head(d.backbone.forward_features(x)[-1]).flatten()
    else:
        plain = d.head(pooled).squeeze(1)
    expected = plain + (d.class_embed.weight[y] * pooled).sum(1)
    torch.testing.assert_close(d(x, y), expected, rtol=1e-6, atol=1e-6)
    assert (d(x, y) - d(x, 1 - y)).abs().min() > 0  # the class moves every logit
    assert not any(k.startswith("class_embed") for k in d.export_backbone().state_dict())  # not in the trunk
    with pytest.raises(ValueError, match="pass class labels"):
        d(x)
    # spectral norm covers the embedding too (the authors' SNEmbedID): largest singular value 1
    sn = RadfordDiscriminator(1, 28, spectral_norm=True, num_classes=2).eval()
    assert parametrize.is_parametrized(sn.class_embed, "weight")
    assert float(torch.linalg.matrix_norm(sn.class_embed.weight.detach(), 2)) == pytest.approx(1.0, rel=0.02)


def test_training_labels_follow_their_images(data_root: Path) -> None:
    ds = build_dataset(DataConfig(), "train", unlabeled=True)  # what the generators train on
    labels, names = class_labels(ds)
    labelled = build_dataset(DataConfig(), "train")
    assert names == CLASSES and labels.dtype == torch.int64 and len(labels) == len(ds) == len(labelled)
    assert torch.equal(labels, torch.as_tensor(labelled.labels, dtype=torch.int64))
    assert 0 < float(labels.float().mean()) < 1  # both classes present
    data = TrainData(ds, 28, None, torch.Generator(), lambda b: b, labels, names)
    idx = torch.tensor([17, 0, 5, 3000])
    expected = torch.tensor([int(labelled[int(i)]["label"]) for i in idx])
    assert torch.equal(data.to_labels(idx), expected)  # the cached loader yields positions ...
    assert torch.equal(data.to_labels({"image": None, "index": idx}), expected)  # ... a sample carries them
    assert data.num_classes == 2 and TrainData(ds, 28, None, torch.Generator(), lambda b: b).to_labels(idx) is None


def test_class_balance_draws_every_class_equally_often(data_root: Path) -> None:
    """train.class_balance: an epoch of batches holds each class about equally often (the shared
    PneumoniaMNIST training split is 10% normal: 388 of 3882 images), reproducibly for the epoch's seed; off, an epoch is a permutation (the
    data's own mix); unconditional runs refuse it; finished runs keep their hashes."""
    from types import SimpleNamespace

    from medpretrain.generative.configs import GenTrainConfig
    from medpretrain.generative.stage import train_data

    stage = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")))

    def epoch(balance: bool, seed: int = 0) -> torch.Tensor:
        cfg = DCGANConfig(conditional=True, train=GenTrainConfig(batch_size=64, class_balance=balance))
        data = train_data(stage, cfg)  # type: ignore[arg-type]
        data.sampler_gen.manual_seed(seed)
        return torch.cat([data.to_labels(b) for b in data.loader])

    plain, balanced = epoch(False), epoch(True)
    n = len(plain)
    data_share = float(torch.as_tensor(build_dataset(DataConfig(), "train").labels == 0).float().mean())
    assert data_share == pytest.approx(388 / 3882) and len(balanced) == n == (3882 // 64) * 64
    assert abs(float((plain == 0).float().mean()) - data_share) < 0.01  # a permutation: the data's share
    assert abs(float((balanced == 0).float().mean()) - 0.5) < 0.03  # 1/2 +- 4 sd of 3840 draws
    assert torch.equal(epoch(True), balanced) and not torch.equal(epoch(True, seed=1), balanced)
    with pytest.raises(ConfigError, match=r"^train.class_balance=true needs conditional=true"):
        train_data(stage, DCGANConfig(train=GenTrainConfig(class_balance=True)))  # type: ignore[arg-type]
    assert "class_balance" not in hash_view(GenTrainConfig())
    assert config_hash(GenTrainConfig()) != config_hash(GenTrainConfig(class_balance=True))


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def write_pngs(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
        names.append(f"im{i:02d}.png")
    return names


@pytest.mark.parametrize("task", ["unlabeled", "multilabel"])
def test_a_source_without_single_label_classes_is_refused_in_one_line(tmp_path: Path, task: str) -> None:
    names = write_pngs(tmp_path / "imgs", 20)
    if task == "unlabeled":
        data = [f"data.dataset=folder:{tmp_path / 'imgs'}"]
    else:
        rows = [f"{n},{i % 2},{(i // 2) % 2}" for i, n in enumerate(names)]
        (tmp_path / "imgs" / "m.csv").write_text("image_path,a,b\n" + "\n".join(rows) + "\n")
        data = [f"data.dataset=manifest:{tmp_path / 'imgs' / 'm.csv'}", "data.label_columns=[a,b]"]
    for script in ("generative/vae.py", "generative/dcgan.py", "generative/ddpm.py"):
        out = tmp_path / "runs" / Path(script).stem
        with pytest.raises(ConfigError) as e:
            run_script(script, [*data, "data.image_size=16", "conditional=true", f"out_dir={out}", "run_name=x"])
        assert str(e.value) == (f"conditional=true needs a source with single-label classes (binary or multiclass), "
                                f"but {data[0].split('=', 1)[1]} is {task}; set conditional=false"), script
        assert not out.exists()  # refused before a run folder was made


def test_per_class_is_refused_for_an_unconditional_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = DCGANGenerator(10, 1, 28, 8)
    save_state_dict(tmp_path / "generator.safetensors", g.state_dict(), generator_meta("dcgan_generator", g, 8))
    for extra in (["per_class=2"], ["classes=[normal]"]):
        with pytest.raises(ConfigError) as e:
            sample([f"model={tmp_path}", f"out={tmp_path / 's'}", *extra])
        assert str(e.value) == (f"per_class, classes and guidance_scale need a class-conditional model, but "
                                f"{tmp_path / 'generator.safetensors'} is unconditional (trained with "
                                "conditional=false); use n=<count>")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="unconditional"):
        sample_classes(g, generator_meta("dcgan_generator", g, 8), [(0, 2)], 0)


# --------------------------------------------------------------------------------------------------
# DCGAN: trains, exports, samples per class, resumes exactly
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("dcgan_cond")
    results = run_script("generative/dcgan.py", [*DCGAN_TINY, "train.max_steps=4", f"out_dir={out}", "run_name=r"])
    return out, results


def test_conditional_dcgan_exports_a_generator_with_its_classes(dcgan_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = dcgan_run
    run = out / "r"
    assert (results["steps"], results["num_classes"], results["class_names"]) == (4, 2, CLASSES)
    state, meta = load_state_dict(run / "generator.safetensors")
    assert (meta["kind"], meta["num_classes"], meta["class_names"], meta["class_dim"]) == \
        ("dcgan_generator", 2, CLASSES, 16)
    assert state["class_embed.weight"].shape == (2, 16) and state["net.0.weight"].shape[0] == 32  # z + embedding
    # the discriminator's projection embedding is trained and checkpointed with it (model_1: D)
    from safetensors.torch import load_file

    ckpt = max((run / "checkpoints").iterdir())
    d_state = load_file(str(ckpt / "model_1.safetensors"))
    assert d_state["class_embed.weight"].shape == (2, d_state["head.weight"].shape[1])
    trunk, bmeta = load_backbone(run / "backbone.safetensors", arch="dcgan_d2", in_channels=1)
    assert bmeta.method == "dcgan" and not any("class_embed" in k for k in trunk.state_dict())
    assert results["sample_stats"]["std"] > 0


def test_sampling_per_class_is_reproducible_and_class_dependent(dcgan_run: tuple[Path, dict[str, Any]],
                                                                tmp_path: Path) -> None:
    out, _ = dcgan_run
    model = out / "r"

    def draw(name: str, *extra: str) -> dict[str, np.ndarray]:
        folder = sample([f"model={model}", f"out={tmp_path / name}", "batch_size=4", "png=false", *extra])
        with np.load(folder / "samples.npz") as npz:  # allow_pickle=False: no object arrays inside
            return {k: npz[k] for k in npz.files}

    a = draw("a", "per_class=5", "seed=3")
    assert sorted(a) == ["class_names", "images", "labels", "seed"]
    assert a["images"].shape == (10, 28, 28) and a["images"].dtype == np.uint8
    assert a["labels"].dtype == np.int64 and a["labels"].tolist() == [0] * 5 + [1] * 5
    assert a["class_names"].dtype.kind == "U" and a["class_names"].tolist() == CLASSES
    draw("b", "per_class=5", "seed=3")
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["per_class"] == {"normal": 5, "pneumonia": 5} and info["n"] == 10

    # a class's samples do not depend on the other classes requested, nor on their order
    only = draw("only", "per_class=5", "seed=3", "classes=[pneumonia]")
    assert only["labels"].tolist() == [1] * 5 and np.array_equal(only["images"], a["images"][5:])
    swapped = draw("swapped", "per_class=5", "seed=3", "classes=[1,0]")
    assert np.array_equal(swapped["images"], np.concatenate([a["images"][5:], a["images"][:5]]))
    assert not np.array_equal(draw("c", "per_class=5", "seed=4")["images"], a["images"])
    # without per_class the n samples are spread over the classes
    assert np.bincount(draw("n", "n=7", "seed=3")["labels"]).tolist() == [4, 3]
    with pytest.raises(ConfigError, match="classes: 'cat' is neither a class of this model"):
        draw("bad", "per_class=1", "classes=[cat]")

    # mix=data: n spread in the training images' class mix, recorded in the export (and, for an export made
    # before class_counts was recorded, read again from its training split: the same counts)
    state, meta = load_state_dict(model / "generator.safetensors")
    script = load_script("generative/sample.py", "cond_sample")
    from medpretrain.config import DataConfig, resolve_config
    from medpretrain.data import build_dataset
    from medpretrain.generative.stage import class_labels

    data = resolve_config(DataConfig, None, [f"{k}={json.dumps(v)}" for k, v in meta["config"]["data"].items()])
    train_labels, _ = class_labels(build_dataset(data, "train", unlabeled=True))
    expected = np.bincount(train_labels.numpy(), minlength=2).tolist()
    assert meta["class_counts"] == expected and expected[0] < expected[1]
    old = {k: v for k, v in meta.items() if k != "class_counts"}
    assert script.training_class_counts(old, model) == expected
    mixed = np.bincount(draw("mixed", "n=40", "mix=data", "seed=3")["labels"], minlength=2).tolist()
    assert mixed == script.proportional(40, expected) and sum(mixed) == 40
    assert abs(mixed[0] - 40 * expected[0] / sum(expected)) < 1
    with pytest.raises(ConfigError, match="mix must be one of even, data, got 'real'"):
        draw("badmix", "mix=real")

    # class-dependent: the same latents give different images for the two classes
    g = build_generator(meta)
    g.load_state_dict(state)
    z = latent_noise(8, 16, 0)
    x0, x1 = (generate(g, z, labels=torch.full((8,), c)) for c in (0, 1))
    assert (x0 - x1).abs().mean() > 1e-3
    images, labels = sample_classes(g, meta, [(1, 5)], 3)
    assert torch.equal(labels, torch.ones(5, dtype=torch.int64))
    torch.testing.assert_close(images, generate(g, latent_noise(5, 16, class_seed(3, 1)), labels=labels))


def test_conditional_dcgan_resumes_exactly(dcgan_run: tuple[Path, dict[str, Any]]) -> None:
    """Two steps, then the budget raised to four and resumed from the step-2 checkpoint: the same weights (the
    class embedding included: the labels of the replayed batches follow their images) and the same logged
    losses as four steps straight."""
    out, _ = dcgan_run
    run_script("generative/dcgan.py", [*DCGAN_TINY, "train.max_steps=2", f"out_dir={out}", "run_name=part"])
    run_script("generative/dcgan.py", [*DCGAN_TINY, "train.max_steps=4", f"out_dir={out}", "run_name=part",
                                       "train.resume=auto"])
    for name, read in (("generator.safetensors", load_state_dict), ("backbone.safetensors", load_backbone_state)):
        a, _ = read(out / "part" / name)
        b, _ = read(out / "r" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert name != "generator.safetensors" or "class_embed.weight" in a

    def rows(run: Path) -> list[list[str]]:
        return [line.split(",")[:-1] for line in (run / "metrics.csv").read_text().splitlines()]

    assert rows(out / "part") == rows(out / "r") and len(rows(out / "r")) == 5


def test_conditional_dcgan_with_the_backbone_discriminator(tmp_path: Path, data_root: Path) -> None:
    results = run_script("generative/dcgan.py", [*DCGAN_TINY, "discriminator=backbone", "backbone.arch=cbr_tiny",
                                                 "spectral_norm=true", "loss=hinge", "train.max_steps=2",
                                                 f"out_dir={tmp_path}", "run_name=b"])
    assert results["num_classes"] == 2 and results["discriminator_arch"] == "cbr_tiny"
    from safetensors.torch import load_file

    d_state = load_file(str(max((tmp_path / "b" / "checkpoints").iterdir()) / "model_1.safetensors"))
    assert "class_embed.parametrizations.weight.original" in d_state  # projection, spectrally normalised
    trunk, _ = load_backbone(tmp_path / "b" / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    assert not any("class_embed" in k for k in trunk.state_dict())


# --------------------------------------------------------------------------------------------------
# VAE and DDPM
# --------------------------------------------------------------------------------------------------


def test_conditional_vae_trains_exports_and_samples_per_class(tmp_path: Path, data_root: Path) -> None:
    results = run_script("generative/vae.py", [*VAE_TINY, "train.max_steps=3", f"out_dir={tmp_path}", "run_name=v"])
    run = tmp_path / "v"
    assert (results["num_classes"], results["class_names"]) == (2, CLASSES) and results["val_mse"] > 0
    state, meta = load_state_dict(run / "decoder.safetensors")
    assert (meta["kind"], meta["num_classes"], meta["class_names"]) == ("vae_decoder", 2, CLASSES)
    assert state["class_embed.weight"].shape == (2, 8) and state["fc.weight"].shape[1] == 16
    encoder, bmeta = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    assert bmeta.method == "vae"  # the trunk is a plain backbone: fine-tuning can start from it

    folder = sample([f"model={run}", f"out={tmp_path / 's'}", "per_class=3", "seed=1", "png=false"])
    with np.load(folder / "samples.npz") as npz:
        assert npz["labels"].tolist() == [0, 0, 0, 1, 1, 1] and npz["class_names"].tolist() == CLASSES
        images = npz["images"]
    decoder = build_generator(meta)
    decoder.load_state_dict(state)
    z = latent_noise(6, 8, 0)
    assert (generate(decoder, z, labels=torch.zeros(6, dtype=torch.int64))
            - generate(decoder, z, labels=torch.ones(6, dtype=torch.int64))).abs().mean() > 1e-3
    again, labels = sample_classes(decoder, meta, [(0, 3), (1, 3)], 1)  # what sample.py drew, as 8-bit pixels
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and np.array_equal(to_uint8(again)[:, 0].numpy(), images)


def test_conditional_ddpm_with_guidance_trains_exports_and_samples_per_class(tmp_path: Path, data_root: Path) -> None:
    results = run_script("generative/ddpm.py", [*DDPM_TINY, "train.max_steps=2", f"out_dir={tmp_path}", "run_name=d"])
    run = tmp_path / "d"
    assert (results["num_classes"], results["class_names"]) == (2, CLASSES)
    state, meta = load_state_dict(run / "unet.safetensors")
    assert (meta["num_classes"], meta["class_names"], meta["null_class"], meta["guidance_scale"]) == \
        (2, CLASSES, 2, 2.0)
    assert meta["unet"]["num_class_embeds"] == 3 and state["class_embedding.weight"].shape[0] == 3  # K + null

    folder = sample([f"model={run}", f"out={tmp_path / 's'}", "per_class=2", "seed=5", "png=false"])
    with np.load(folder / "samples.npz") as npz:
        assert npz["labels"].tolist() == [0, 0, 1, 1] and npz["images"].shape == (4, 28, 28)
    unet = build_generator(meta)
    unet.load_state_dict(state)
    y0, y1 = torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    x0 = ddpm_sample(unet, 2, 0, meta, labels=y0)
    assert (x0 - ddpm_sample(unet, 2, 0, meta, labels=y1)).abs().mean() > 1e-4  # same noise, other class
    assert (x0 - ddpm_sample(unet, 2, 0, meta, labels=y0, guidance_scale=1.0)).abs().mean() > 1e-4  # guidance
    torch.testing.assert_close(x0, ddpm_sample(unet, 2, 0, meta, labels=y0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass class labels"):
        ddpm_sample(unet, 2, 0, meta)
