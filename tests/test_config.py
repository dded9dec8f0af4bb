"""The typed config schema: YAML + overrides on top of dataclass defaults, strict keys and types."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from medpretrain.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    config_hash,
    load_config,
    parse_args,
    save_config,
)


@dataclass
class Optim:
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [50, 75])


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: Optim = field(default_factory=Optim)
    init: str = "scratch"
    seed: int = 0
    resume: str | None = None
    amp: bool = False


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\noptim:\n  lr: 0.01\ndata:\n  image_size: 64\n")
    cfg = load_config(RunConfig, ["--config", str(f), "optim.lr=1e-3", "--init", "imagenet", "--amp"])
    assert cfg.seed == 3  # from file
    assert cfg.optim.lr == pytest.approx(1e-3)  # override beats file; "1e-3" parsed as float
    assert cfg.data.image_size == 64
    assert cfg.data.channels == 1  # untouched default
    assert cfg.init == "imagenet" and cfg.amp is True
    assert cfg.optim.milestones == [50, 75]


def test_override_forms_are_equivalent():
    a = load_config(RunConfig, ["data.image_size=32", "resume=auto"])
    b = load_config(RunConfig, ["--data.image_size", "32", "--resume", "auto"])
    c = load_config(RunConfig, ["--data.image_size=32", "--resume=auto"])
    assert a == b == c
    assert a.resume == "auto"


def test_list_and_none_values():
    cfg = load_config(RunConfig, ["optim.milestones=[10, 20, 30]", "data.image_size=null"])
    assert cfg.optim.milestones == [10, 20, 30]
    assert cfg.data.image_size is None


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["data.imagesize=3"], "unknown config key 'data.imagesize' (did you mean 'data.image_size'?)"),
        (["nope=1"], "unknown config key 'nope'; valid keys here: data, backbone, optim, init, seed, resume, amp"),
        (["optim.lr=fast"], "config key 'optim.lr': expected a number"),
        (["seed=1.5"], "config key 'seed': expected an integer"),
        (["amp=maybe"], "config key 'amp': expected true/false"),
        (["data=3"], "expected a mapping of DataConfig fields"),
        (["optim.milestones=5"], "expected a list"),
        (["justaword"], "cannot parse argument 'justaword'"),
    ],
)
def test_bad_keys_and_types_fail_with_the_key_named(argv, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, argv)
    assert fragment in str(e.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(RunConfig, ["--config", str(bad)])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: a config file must be a mapping"):
        load_config(RunConfig, [str(lst)])
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(RunConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_yaml_cannot_build_python_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("init: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, [str(evil)])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, ["optim.lr=0.005", "data.dataset=folder:busi", "seed=7"])
    path = save_config(cfg, tmp_path)
    assert path.name == "config.yaml"
    again = load_config(RunConfig, ["--config", str(path)])
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(RunConfig, ["seed=8"])) != config_hash(cfg)
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.005


def test_parse_args_splits_files_and_overrides():
    files, over = parse_args(["a.yaml", "--config", "b.yml", "x.y=1", "--flag"])
    assert files == ["a.yaml", "b.yml"]
    assert over == {"x": {"y": 1}, "flag": True}


@dataclass
class Train:
    resume: str = ""


@dataclass
class AliasedConfig:
    ALIASES = {"resume": "train.resume"}  # not annotated: a class attribute, not a config key
    train: Train = field(default_factory=Train)


def test_alias_maps_documented_short_flag_to_nested_key():
    assert load_config(AliasedConfig, ["--resume", "auto"]).train.resume == "auto"
    assert load_config(AliasedConfig, ["train.resume=auto"]).train.resume == "auto"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(AliasedConfig, ["resum=auto"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["lr=1"], "unknown config key 'lr' (did you mean 'optim.lr'?)"),  # group prefix forgotten
        (["sed=1"], "unknown config key 'sed' (did you mean 'seed'?)"),
        (["optim.lrr=1", "optim.zzz=2"], "unknown config keys 'optim.lrr' (did you mean 'optim.lr'?), 'optim.zzz'"),
        (["optim.zzz=2"], "unknown config key 'optim.zzz'; valid keys here: optim.lr, optim.milestones"),
    ],
)
def test_unknown_key_suggests_the_nearest_valid_one(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, argv)
    assert str(e.value) == message


def test_dataset_specs_with_colons_stay_strings():
    assert load_config(RunConfig, ["data.dataset=drive:"]).data.dataset == "drive:"
    assert load_config(RunConfig, ["--data.dataset", "folder:a: b"]).data.dataset == "folder:a: b"
    with pytest.raises(ConfigError, match="expected a mapping of DataConfig fields"):
        load_config(RunConfig, ["data={dataset: 3"])  # broken YAML stays a string, not a mapping


def test_an_option_added_at_its_neutral_value_keeps_every_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a behaviour-preserving option (listed in HASH_NEUTRAL) must not invalidate finished runs, and
    setting it to anything else must."""
    import dataclasses as dc

    from medpretrain import config as config_module

    @dc.dataclass
    class Inner:
        a: int = 1

    @dc.dataclass
    class InnerWithOption:
        a: int = 1
        column: str = "label"

    @dc.dataclass
    class Old:
        inner: Inner = dc.field(default_factory=Inner)
        items: list[int] = dc.field(default_factory=lambda: [1, 2])

    @dc.dataclass
    class New:
        inner: InnerWithOption = dc.field(default_factory=InnerWithOption)
        items: list[int] = dc.field(default_factory=lambda: [1, 2])

    monkeypatch.setitem(config_module.HASH_NEUTRAL, "InnerWithOption", {"column": "label"})
    assert config_module.config_hash(New()) == config_module.config_hash(Old())
    assert config_module.config_hash(New(InnerWithOption(column="finding"))) != config_module.config_hash(Old())
    assert config_module.config_hash(New(InnerWithOption(a=2))) != config_module.config_hash(Old())
    assert config_module.config_to_dict(New())["inner"]["column"] == "label"  # saved configs keep every key


def test_execution_only_options_never_change_a_hash() -> None:
    """How a run executes (grid cells at once, images in memory / in a disk cache / decoded on access) is not in
    any hash, at any value, while a result-changing option next to them still is; and every execution-only
    option is also hash-neutral, so runs made before the table existed keep their hashes."""
    import dataclasses as dc

    from medpretrain.config import EXECUTION_ONLY, HASH_NEUTRAL, DataConfig, config_hash
    from medpretrain.finetune import FinetuneConfig
    from medpretrain.pipeline.grid import CompareConfig

    base = FinetuneConfig()
    for option in ("stream", "cache"):
        assert config_hash(dc.replace(base, data=dc.replace(base.data, **{option: True}))) == config_hash(base)
    assert config_hash(dc.replace(base, data=dc.replace(base.data, cache_workers=3))) == config_hash(base)
    assert config_hash(dc.replace(base, data=dc.replace(base.data, clahe=True))) != config_hash(base)
    assert config_hash(CompareConfig(workers=2)) == config_hash(CompareConfig(workers=1))
    assert config_hash(CompareConfig(seeds=[5])) != config_hash(CompareConfig())
    assert {f.name for f in dc.fields(DataConfig)} >= EXECUTION_ONLY["DataConfig"]
    for cls, names in EXECUTION_ONLY.items():
        assert names <= set(HASH_NEUTRAL[cls]), cls


def test_a_section_given_in_part_keeps_its_fields_own_defaults() -> None:
    """A dataclass field whose factory sets other defaults than the section class (the DDPM's train section:
    lr 2e-4, 100 steps, batch 64) keeps them when a config or override gives only some of its keys."""
    from medpretrain.generative.configs import DDPMConfig, GenTrainConfig, VAEConfig

    plain = GenTrainConfig()
    assert (plain.max_steps, plain.batch_size) != (100, 64)  # else this test proves nothing
    cfg = load_config(DDPMConfig, ["train.lr=1e-3"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size, cfg.train.checkpoint_every) == (1e-3, 100, 64, 50)
    assert load_config(VAEConfig, ["train.epochs=3"]).train.lr == 1e-3  # VAE's own default, not GenTrainConfig's
    assert load_config(VAEConfig, ["train.epochs=3"]).train.lr != plain.lr


def test_experiment_segmentation_section_keeps_its_default_config() -> None:
    from medpretrain.pipeline.schema import ExperimentConfig

    cfg = load_config(ExperimentConfig, ["segmentation.enabled=true", "name=x"])
    assert cfg.segmentation.config == "configs/compare_drive.yaml"
