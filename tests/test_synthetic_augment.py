"""Synthetic images added to a label budget (``data.synthetic``, issue 17): exactly the configured number per class,
training split only, drawn by the run's seed, refused in one line when the file cannot be used; the experiment's
``data.synthetic=stage:<generator>`` resolved to that generator's per-class samples; fine-tuning runs that record
what was added.

Real data: PneumoniaMNIST 28 px (local train split 388 normal / 3494 pneumonia; at 1 % of the labels 4 / 35).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medpretrain.config import ConfigError, DataConfig, config_hash, hash_view, load_config
from medpretrain.data import DataError, build_dataset, read_source
from medpretrain.data.synthetic import SyntheticAugmented, augment_train, check_options, real_images, wanted
from medpretrain.finetune import FinetuneConfig, build_dataloaders, build_seg_dataloaders, main_in_process
from medpretrain.generative.sampling import save_npz
from medpretrain.pipeline import stages
from medpretrain.pipeline.experiment import ExperimentConfig
from medpretrain.pipeline.grid import grid
from medpretrain.pipeline.stages import Stage, grid_config, grid_stage, resolve_synthetic
from medpretrain.utils import sha256_file

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("normal", "pneumonia")
REAL_1PCT = [4, 35]  # PneumoniaMNIST's local train split at label_fraction 0.01, per class


def write_samples(path: Path, per_class=(60, 60), size: int | tuple[int, int] = 28, rgb: bool = False, seed: int = 0,
                  class_names=NAMES, drop: str = "", dtype=np.uint8) -> np.ndarray:
    """A samples.npz in the format of generative/sample.py per_class=<n>; returns its images."""
    h, w = (size, size) if isinstance(size, int) else size
    n = int(sum(per_class))
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3) if rgb else (n, h, w)).astype(dtype)
    arrays = {"images": images, "labels": np.repeat(np.arange(len(per_class)), per_class).astype(np.int64),
              "seed": np.asarray(seed, dtype=np.int64)}
    if class_names is not None:
        arrays["class_names"] = np.asarray(class_names)
    arrays.pop(drop, None)
    save_npz(path, arrays)
    return images


def ft_config(data_root: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, ["--config", str(ROOT / "configs/finetune.yaml"), f"data.root={data_root}",
                                        "data.label_fraction=0.01", "backbone.arch=cbr_tiny", "optim.steps=0",
                                        "optim.augment=none", *extra])


def synth(path: Path, *extra: str) -> list[str]:
    return [f"data.synthetic={path}", *extra]


# ------------------------------------------------------------------------------------------------
# The option: counts, splits, rounding, seeds
# ------------------------------------------------------------------------------------------------


def test_adds_the_configured_count_per_class_to_the_training_split_only(tmp_path: Path, data_root: Path) -> None:
    f = tmp_path / "samples.npz"
    images = write_samples(f)
    plain = build_dataloaders(ft_config(data_root))
    aug = build_dataloaders(ft_config(data_root, *synth(f, "data.synthetic_ratio=1.0")))
    real, train = plain["datasets"]["train"], aug["datasets"]["train"]
    assert np.bincount(real.labels).tolist() == REAL_1PCT and plain["data"] == {}
    assert isinstance(train, SyntheticAugmented) and real_images(train) is train.real
    np.testing.assert_array_equal(train.real.indices, real.indices)  # the label subset is the same
    assert len(train) == 39 + 39 and np.bincount(train.labels[39:]).tolist() == REAL_1PCT
    rec = aug["data"]["synthetic"]
    assert rec["added_per_class"] == REAL_1PCT and rec["real_per_class"] == REAL_1PCT and rec["added"] == 39
    assert rec["file"] == str(f.resolve()) and rec["sha256"] == sha256_file(f) and rec["available_per_class"] == [60, 60]
    for split in ("val", "test"):  # unchanged: same images, same order
        a, b = plain["datasets"][split], aug["datasets"][split]
        assert type(b).__name__ == "MedicalDataset" and len(a) == len(b) == {"val": 524, "test": 624}[split]
        np.testing.assert_array_equal(a.indices, b.indices)
        assert torch.equal(next(iter(plain["loaders"][split]))["image"], next(iter(aug["loaders"][split]))["image"])
    # The real items are the plain run's; the synthetic ones are the file's chosen images, normalised alike.
    assert torch.equal(train[5]["image"], real[5]["image"]) and int(train[5]["label"]) == int(real.labels[5])
    for k in (0, 3, 38):
        item, j = train[39 + k], rec["file_indices"][k]
        expect = (torch.from_numpy(images[j].astype(np.float32)) / 255 - 0.5) / 0.5
        torch.testing.assert_close(item["image"], expect[None])
        assert int(item["label"]) == (0 if j < 60 else 1) and item["index"] == 39 + k
    # The training loader goes over real + synthetic, each item once per pass.
    seen = torch.cat([b["index"] for b in aug["loaders"]["train"]])
    assert sorted(seen.tolist()) == list(range(78))


@pytest.mark.parametrize("option, expect", [
    ("data.synthetic_ratio=0.625", [3, 22]),  # 2.5 -> 3 (half up, not to even), 21.875 -> 22
    ("data.synthetic_ratio=0.1", [0, 4]),  # 0.4 -> 0, 3.5 -> 4
    ("data.synthetic_ratio=2.0", [8, 70]),
    ("data.synthetic_per_class=7", [7, 7]),
])
def test_counts_round_per_class(tmp_path: Path, data_root: Path, option: str, expect: list[int]) -> None:
    f = tmp_path / "samples.npz"
    write_samples(f, per_class=(80, 80))
    train = build_dataloaders(ft_config(data_root, *synth(f, option)))["datasets"]["train"]
    assert np.bincount(train.labels[39:], minlength=2).tolist() == expect == train.synthetic["added_per_class"]
    assert wanted([5, 7, 1], 0.5, None) == [3, 4, 1] and wanted([5, 7], 0.0, 2) == [2, 2]


def test_the_draw_follows_the_run_seed(tmp_path: Path, data_root: Path) -> None:
    f = tmp_path / "samples.npz"
    write_samples(f, per_class=(80, 80))

    def drawn(seed: int, ratio: float) -> list[int]:
        cfg = ft_config(data_root, f"seed={seed}", "data.subset_seed=0", *synth(f, f"data.synthetic_ratio={ratio}"))
        return build_dataloaders(cfg)["datasets"]["train"].synthetic["file_indices"]

    a, b, c = drawn(0, 1.0), drawn(0, 1.0), drawn(1, 1.0)
    assert a == b and len(a) == len(c) == 39 and a != c
    assert set(drawn(0, 0.5)) <= set(a)  # a smaller count takes the first images of the same permutation
    assert len(set(a)) == 39  # without replacement


def test_images_are_converted_like_the_real_images_are(tmp_path: Path, data_root: Path) -> None:
    """A 64 px RGB file on 28 px grey data: the synthetic images are what the MedMNIST reader makes of the same
    pixels (/ 255, ITU-R 601 luma, antialiased bilinear resize)."""
    f = tmp_path / "samples.npz"
    rgb = write_samples(f, per_class=(50, 50), size=64, rgb=True)
    real = build_dataset(DataConfig(dataset="medmnist:pneumoniamnist", root=str(data_root), label_fraction=0.01),
                         "train", seed=0)
    train = augment_train(real, DataConfig(dataset="medmnist:pneumoniamnist", synthetic=str(f), synthetic_ratio=1.0), 0)
    assert train.images.shape == (39, 1, 28, 28) and train.synthetic["converted"]
    fake = tmp_path / "fake"
    fake.mkdir()
    labels = np.zeros((len(rgb), 1), dtype=np.int64)
    save_npz(fake / "fakergb_64.npz", {f"{s}_{k}": v for s in ("train", "val", "test")
                                       for k, v in (("images", rgb), ("labels", labels))})
    ref = read_source(DataConfig(dataset="medmnist:fakergb@64", root=str(fake), image_size=28)).images
    np.testing.assert_allclose(train.images, ref[np.asarray(train.synthetic["file_indices"])], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Refusals: one line, naming the file or the key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda f: None, "synthetic sample file not found"),
    (lambda f: f.write_bytes(b"not a zip"), "not a readable .npz file"),
    (lambda f: write_samples(f, drop="labels"), "has no 'labels'"),
    (lambda f: write_samples(f, drop="images"), "has no 'images'"),
    (lambda f: write_samples(f, per_class=(3, 60)), "has 3 images of class 0 ('normal'), the run needs 4"),
    (lambda f: write_samples(f, class_names=("healthy", "pneumonia")), "class names ['healthy', 'pneumonia'] differ"),
    (lambda f: write_samples(f, per_class=(60, 60, 5), class_names=None), "has label 2 but the data source has 2"),
    (lambda f: write_samples(f, class_names=("normal", "pneumonia", "covid")), "differ from the data source's"),
    (lambda f: write_samples(f, dtype=np.float32), "expected uint8"),
    (lambda f: save_npz(f, {"images": np.zeros((4, 28, 28, 2), np.uint8), "labels": np.zeros(4, np.int64)}),
     "expected [N, H, W] or [N, H, W, 1 or 3]"),
    (lambda f: save_npz(f, {"images": np.zeros((4, 28, 28), np.uint8), "labels": np.zeros((4, 1), np.int64)}),
     "expected 4 integer class indices"),
    (lambda f: write_samples(f, size=(28, 56)), "aspect ratios differ"),
])
def test_a_file_that_cannot_be_used_is_refused_in_one_line(tmp_path: Path, data_root: Path, make, message: str) -> None:
    f = tmp_path / "samples.npz"
    make(f)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        build_dataloaders(ft_config(data_root, *synth(f, "data.synthetic_ratio=1.0")))
    assert str(e.value).startswith(f"{f.resolve()}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("values, message", [
    ({"synthetic_ratio": 1.0}, "need data.synthetic"),
    ({"synthetic_per_class": 5}, "need data.synthetic"),
    ({"synthetic": "s.npz"}, "adds nothing"),
    ({"synthetic": "s.npz", "synthetic_ratio": 1.0, "synthetic_per_class": 5}, "not both"),
    ({"synthetic": "s.npz", "synthetic_ratio": -1.0}, "must be >= 0"),
])
def test_bad_options_are_config_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**values)


def test_tasks_that_cannot_take_synthetic_images_refuse_them(tmp_path: Path, data_root: Path) -> None:
    f = tmp_path / "samples.npz"
    write_samples(f)
    seg = ft_config(data_root, "task=segmentation", *synth(f, "data.synthetic_ratio=1.0"))
    with pytest.raises(ConfigError, match="classification training only"):
        build_seg_dataloaders(seg)
    with pytest.raises(ConfigError, match="multi-task runs"):
        check_options(DataConfig(synthetic=str(f), synthetic_ratio=1.0), "classification", multitask=True)
    fake = tmp_path / "fake"
    fake.mkdir()
    x, y = np.zeros((6, 28, 28), np.uint8), np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1, 2]]
    save_npz(fake / "fakechest.npz", {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", x),
                                                                                                    ("labels", y))})
    multilabel = DataConfig(dataset="medmnist:fakechest", root=str(fake), synthetic=str(f), synthetic_ratio=1.0)
    with pytest.raises(ConfigError, match="needs single-label classes"):
        augment_train(build_dataset(multilabel, "train"), multilabel, 0)
    # A bad file stops the script before the run folder exists.
    out = tmp_path / "run"
    write_samples(f, per_class=(3, 60))
    with pytest.raises(DataError, match="has 3 images of class 0"):
        main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), f"data.root={data_root}",
                         "data.label_fraction=0.01", *synth(f, "data.synthetic_ratio=1.0"), f"output_dir={out}"])
    assert not out.exists()


@pytest.mark.parametrize("script", ["pretrain/simclr.py", "generative/vae.py"])
def test_training_stages_refuse_synthetic_images_instead_of_ignoring_them(tmp_path: Path, data_root: Path,
                                                                         script: str) -> None:
    """Pretraining and generator training read unlabeled real images only: ``data.synthetic`` there is refused in
    one line (exit 2) before a run folder is made, not silently dropped."""
    import os
    import subprocess
    import sys

    f = tmp_path / "samples.npz"
    write_samples(f)
    env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    env.pop("MEDPRETRAIN_DEBUG", None)
    proc = subprocess.run([sys.executable, str(ROOT / script), f"out_dir={tmp_path}", "run_name=r",
                           *synth(f, "data.synthetic_per_class=5")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    stage = Path(script).stem
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (f"error: data.synthetic={str(f)!r} is a fine-tuning option; the {stage} stage would "
                           "ignore it (drop it from this stage's overrides)\n")
    assert not (tmp_path / "r").exists()


def test_the_neutral_defaults_keep_every_hash() -> None:
    assert config_hash(DataConfig()) == config_hash(DataConfig(synthetic="", synthetic_ratio=0.0))
    assert config_hash(DataConfig(synthetic="a.npz", synthetic_ratio=1.0)) != config_hash(DataConfig())
    assert "synthetic" not in json.dumps(hash_view(DataConfig()))


# ------------------------------------------------------------------------------------------------
# Fine-tuning runs with synthetic images
# ------------------------------------------------------------------------------------------------


def test_a_trained_run_uses_and_records_the_synthetic_images(tmp_path: Path, data_root: Path) -> None:
    f = tmp_path / "samples.npz"
    write_samples(f)
    out = tmp_path / "full"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), f"data.root={data_root}",
                            "data.label_fraction=0.01", "backbone.arch=cbr_tiny", "optim.steps=4", "optim.eval_every=2",
                            "optim.batch_size=32", "n_bootstrap=50", "eval.reuse_images=0",
                            *synth(f, "data.synthetic_ratio=0.5"), f"output_dir={out}"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["optimizer_steps"] == 4
    data = res["data"]
    assert data["train_size"] == 39 and data["train_class_counts"] == REAL_1PCT  # the label budget: real images
    assert (data["val_size"], data["test_size"]) == (524, 624)
    syn = data["synthetic"]
    assert syn["added_per_class"] == [2, 18] and syn["added"] == 20 and syn["sha256"] == sha256_file(f)
    assert syn["file"] == str(f.resolve()) and syn["ratio"] == 0.5 and syn["draw_seed"] == 0
    assert len(np.load(out / "predictions.npz")["test_probs"]) == 624


def test_frozen_read_outs_fit_on_all_training_images_with_bn_statistics_of_the_real_ones(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medpretrain import probe

    seen: list[int] = []
    original = probe.reestimate_frozen_bn

    def spy(model, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(dataset))
        return original(model, dataset, *args, **kwargs)

    monkeypatch.setattr(probe, "reestimate_frozen_bn", spy)
    f = tmp_path / "samples.npz"
    write_samples(f)
    out = tmp_path / "knn"
    code = main_in_process(["--config", str(ROOT / "configs/finetune.yaml"), f"data.root={data_root}",
                            "data.label_fraction=0.01", "backbone.arch=cbr_tiny", "regime=knn", "n_bootstrap=50",
                            *synth(f, "data.synthetic_ratio=1.0"), f"output_dir={out}"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert seen == [39]  # BatchNorm statistics: the real training images only
    assert res["regime_info"]["readout"]["bank_size"] == 78  # the kNN bank: real + synthetic
    assert res["data"]["synthetic"]["added"] == 39


# ------------------------------------------------------------------------------------------------
# The experiment arm: data.synthetic=stage:<generator>[:<n>]
# ------------------------------------------------------------------------------------------------


def experiment(tmp_path: Path, **extra: object) -> ExperimentConfig:
    exp = {"name": "syn", "out_dir": str(tmp_path), "launch": {"launcher": "python"},
           "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny"],
           "simclr": {"enabled": False}, "moco": {"enabled": False}, "vae": {"enabled": False},
           "dcgan": {"enabled": True}, "audit": {"enabled": False},
           "classification": {"enabled": True, "inits": ["scratch"],
                              "grid": ["label_fractions=[0.01]", "seeds=[0]", "regimes=[knn]", "n_bootstrap=20"],
                              "overrides": ["n_bootstrap=20"]},
           "variants": [{"name": "synthetic", "inits": ["scratch"],
                         "overrides": ["data.synthetic=stage:dcgan:40", "data.synthetic_ratio=1.0"]}], **extra}
    (tmp_path / "syn.yaml").write_text(yaml.safe_dump(exp))
    return load_config(ExperimentConfig, ["--config", str(tmp_path / "syn.yaml")])


def dcgan_export(tmp_path: Path, h: str = "abc123") -> dict[str, list[Stage]]:
    return {"dcgan": [Stage("dcgan", h, str(tmp_path / "syn" / "dcgan" / h / "backbone.safetensors"))]}


def test_stage_references_resolve_to_the_generators_per_class_samples(tmp_path: Path) -> None:
    exp_dir, exports = tmp_path / "syn", dcgan_export(tmp_path)
    over, src = resolve_synthetic(["a=1", "data.synthetic=stage:dcgan:40", "data.synthetic_ratio=1.0"], exp_dir,
                                  exports)
    assert src is not None and src.per_class == 40 and src.label == "dcgan"
    assert src.model == exp_dir / "dcgan" / "abc123" / "generator.safetensors"
    assert src.npz == exp_dir / "samples" / f"dcgan-per-class-{src.hash}" / "samples.npz"
    assert over == ["a=1", f"data.synthetic={src.npz}", "data.synthetic_ratio=1.0"]
    # The two-token form, the default count, and a count / generator change giving another file.
    over2, src2 = resolve_synthetic(["--data.synthetic", "stage:dcgan", "x=2"], exp_dir, exports)
    assert over2 == [f"data.synthetic={src2.npz}", "x=2"] and src2.per_class == stages.SYNTHETIC_PER_CLASS
    assert len({src.npz, src2.npz, resolve_synthetic(["data.synthetic=stage:dcgan:40"], exp_dir,
                                                     dcgan_export(tmp_path, "other"))[1].npz}) == 3
    assert resolve_synthetic(["data.synthetic=/a/b.npz"], exp_dir, exports) == (["data.synthetic=/a/b.npz"], None)
    with pytest.raises(ConfigError, match="no generator stage 'vae'"):
        resolve_synthetic(["data.synthetic=stage:vae"], exp_dir, exports)
    with pytest.raises(ConfigError, match="samples per class >= 1"):
        resolve_synthetic(["data.synthetic=stage:dcgan:0"], exp_dir, exports)

    # In the experiment: the variant's arm scratch@synthetic gets the file, the base arm does not.
    cfg = experiment(tmp_path, dry_run=True)
    cells = grid(grid_config(cfg, exp_dir, "classification", exports, cfg.variants[0]))
    (argv,) = cells
    assert "init_name=scratch@synthetic" in argv and f"data.synthetic={src.npz}" in argv
    assert not any(a.startswith("data.synthetic") for a in grid(grid_config(cfg, exp_dir, "classification", exports))[0])


@pytest.mark.parametrize("extra, message", [
    ({"common": ["data.synthetic=stage:dcgan"]}, "common has data.synthetic"),
    ({"dcgan": {"enabled": False}}, "stage dcgan is not enabled"),
    ({"variants": [{"name": "s", "overrides": ["data.synthetic=stage:simclr", "data.synthetic_ratio=1"]}]},
     "'simclr' is not a generator stage"),
    ({"simclr": {"enabled": True}, "variants": [{"name": "s", "stages": ["simclr"],
                                                 "overrides": ["data.synthetic=stage:dcgan", "data.synthetic_ratio=1"]}]},
     "which would get it too"),
])
def test_bad_stage_references_are_refused_before_anything_runs(tmp_path: Path, extra: dict, message: str) -> None:
    cfg = experiment(tmp_path, dry_run=True, **extra)
    with pytest.raises(ConfigError, match=message):
        stages.check_backbone_refs(cfg)


def test_the_synthetic_arm_samples_its_generator_then_fine_tunes(tmp_path: Path, data_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """grid_stage draws the per-class samples (generative/sample.py per_class=<n>, faked here: it belongs to the
    generators) before the cells, and each cell records the file it used."""
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(data_root))
    calls: list[list[str]] = []

    def fake_sampler(cmd: list[str], log: Path, console=None) -> int:  # type: ignore[no-untyped-def]
        calls.append(cmd)
        args = dict(a.split("=", 1) for a in cmd[2:])
        write_samples(Path(args["out"]) / "samples.npz", per_class=(int(args["per_class"]),) * 2)
        return 0

    monkeypatch.setattr(stages, "run_logged", fake_sampler)
    cfg = experiment(tmp_path)
    exp_dir, exports = tmp_path / "syn", dcgan_export(tmp_path)
    stage, results = grid_stage(cfg, exp_dir, "classification", exports, variant=cfg.variants[0])
    (cmd,) = calls
    assert cmd[1] == str(stages.ROOT / stages.SAMPLE_SCRIPT) and "per_class=40" in cmd
    assert f"model={exp_dir / 'dcgan' / 'abc123' / 'generator.safetensors'}" in cmd
    (res,) = results
    assert res.status == "complete" and res.init_label == "scratch@synthetic"
    npz = Path(res.data["synthetic"]["file"])
    assert npz.parent.parent == exp_dir / "samples" and res.data["synthetic"]["added_per_class"] == REAL_1PCT
    assert res.data["synthetic"]["sha256"] == sha256_file(npz) and "synthetic samples run" in stage.detail
    # Run again: the samples and the cell are reused.
    stage2, _ = grid_stage(cfg, exp_dir, "classification", exports, variant=cfg.variants[0])
    assert len(calls) == 1 and stage2.status == "reused"
