"""Experiment variants (issue 15): arms run again with other overrides (another architecture or image size)
and compared with the base arms in one report, e.g. scratch / ImageNet / SimCLR on EfficientNet-Lite0 next to
the ResNet-18 arms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medpretrain.config import ConfigError, load_config
from medpretrain.pipeline.experiment import ExperimentConfig, run_experiment
from medpretrain.pipeline.grid import grid
from medpretrain.pipeline.stages import grid_config, train_stage

TINY_PRETRAIN = ["train.max_steps=3", "train.batch_size=32", "train.knn_every=-1", "train.checkpoint_every=3"]


def experiment(tmp_path: Path, **extra: object) -> ExperimentConfig:
    exp = {"name": "var", "title": "variants", "out_dir": str(tmp_path),
           "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny", "backbone.stem=standard"],
           "launch": {"launcher": "python"},
           "simclr": {"overrides": TINY_PRETRAIN}, "moco": {"enabled": False}, "vae": {"enabled": False},
           "dcgan": {"enabled": False}, "audit": {"enabled": False},
           "classification": {"enabled": True, "inits": ["scratch", "simclr"],
                              "grid": ["label_fractions=[0.05]", "seeds=[0]", "regimes=[linear]", "n_bootstrap=20"],
                              "overrides": ["optim.batch_size=32", "n_bootstrap=20"]},
           "variants": [{"name": "px32", "overrides": ["data.image_size=32"], "stages": ["simclr"]}], **extra}
    (tmp_path / "var.yaml").write_text(yaml.safe_dump(exp))
    return load_config(ExperimentConfig, ["--config", str(tmp_path / "var.yaml")])


def test_variant_stage_and_grid_get_the_overrides_last_and_their_own_names(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, dry_run=True)
    base = train_stage(cfg, tmp_path / "var", "simclr")
    var = train_stage(cfg, tmp_path / "var", "simclr", variant=cfg.variants[0])
    assert (base.name, var.name) == ("simclr", "simclr@px32")
    assert base.hash != var.hash  # image size 32 is in the variant's config hash
    exports = {"simclr": [base], "simclr@px32": [var]}
    cells = grid(grid_config(cfg, tmp_path / "var", "classification", exports, cfg.variants[0]))
    named = {dict(a.split("=", 1) for a in argv if "=" in a)["init_name"]: argv for argv in cells}
    assert sorted(named) == ["imagenet@px32", "scratch@px32", "simclr@px32"]  # default: scratch, imagenet, stages
    assert "init=scratch" in named["scratch@px32"] and f"init={var.output}" in named["simclr@px32"]
    argv = named["scratch@px32"]
    assert argv.index("data.image_size=32") > argv.index("backbone.arch=cbr_tiny")  # after common
    base_cells = grid(grid_config(cfg, tmp_path / "var", "classification", exports))
    assert not any("data.image_size=32" in a for a in base_cells)


def test_a_variant_can_run_only_some_cells_of_the_grid(tmp_path: Path) -> None:
    """``variants[].grid``: a costly variant (here 32 px) runs only the budgets, regimes and seeds it names, after
    the task's own grid options; the base grid keeps all of its cells."""
    variant = {"name": "px32", "overrides": ["data.image_size=32"], "stages": ["simclr"], "inits": ["simclr"],
               "grid": ["label_fractions=[1.0]", "regimes=[full]", "seeds=[0, 1]"]}
    cfg = experiment(tmp_path, dry_run=True, variants=[variant])
    cfg.classification.grid = ["label_fractions=[0.05, 1.0]", "seeds=[0]", "regimes=[linear, full]"]
    base = train_stage(cfg, tmp_path / "var", "simclr")
    var = train_stage(cfg, tmp_path / "var", "simclr", variant=cfg.variants[0])
    exports = {"simclr": [base], "simclr@px32": [var]}
    ccfg = grid_config(cfg, tmp_path / "var", "classification", exports, cfg.variants[0])
    assert (ccfg.label_fractions, ccfg.regimes, ccfg.seeds) == ([1.0], ["full"], [0, 1])
    assert len(grid(ccfg)) == 2
    assert len(grid(grid_config(cfg, tmp_path / "var", "classification", exports))) == 2 * 2 * 2  # inits x budgets x regimes


def test_variant_overrides_reach_only_the_configs_that_have_their_group(tmp_path: Path) -> None:
    """A variant's ``optim.steps`` reaches its fine-tune cells, not its pretraining (whose schema has no
    ``optim``); its ``train.max_steps`` reaches the pretraining, not the cells; a group nothing has is refused."""
    plain = experiment(tmp_path, dry_run=True)
    both = experiment(tmp_path, dry_run=True, variants=[
        {"name": "px32", "overrides": ["data.image_size=32", "optim.steps=7", "train.max_steps=5"],
         "stages": ["simclr"]}])
    only_ft = experiment(tmp_path, dry_run=True, variants=[
        {"name": "px32", "overrides": ["data.image_size=32", "optim.steps=7"], "stages": ["simclr"]}])
    h = {name: train_stage(c, tmp_path / "var", "simclr", variant=c.variants[0]).hash
         for name, c in (("plain", plain), ("both", both), ("only_ft", only_ft))}
    assert h["only_ft"] == h["plain"] != h["both"]  # optim.* never reached the stage; train.max_steps did
    var = train_stage(both, tmp_path / "var", "simclr", variant=both.variants[0])
    cells = grid(grid_config(both, tmp_path / "var", "classification", {"simclr": [var], "simclr@px32": [var]},
                             both.variants[0]))
    assert cells and all("optim.steps=7" in argv and "data.image_size=32" in argv for argv in cells)
    assert not any("train.max_steps=5" in argv for argv in cells)
    typo = experiment(tmp_path, dry_run=True, variants=[
        {"name": "v", "overrides": ["optm.steps=7"], "stages": ["simclr"]}])
    with pytest.raises(ConfigError, match=r"^variants\[v\]\.overrides has 'optm.steps=7': neither the fine-tune "
                                          r"cells nor the variant's stages \(simclr\) have a 'optm' group$"):
        run_experiment(typo)


@pytest.mark.parametrize("variant, message", [
    ({"name": "", "stages": []}, "own short name"),
    ({"name": "a@b", "stages": []}, "own short name"),
    ({"name": "v", "stages": ["moco"]}, "not an enabled training stage"),
    ({"name": "v", "stages": [], "inits": ["simclr"]}, "add it to variants[v].stages"),
])
def test_bad_variants_are_refused_before_anything_runs(tmp_path: Path, variant: dict, message: str) -> None:
    cfg = experiment(tmp_path, dry_run=True, variants=[variant])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_experiment(cfg)
    assert not (tmp_path / "var" / "simclr").exists()


def test_variant_arms_are_trained_fine_tuned_and_ranked_with_the_base_arms(tmp_path: Path) -> None:
    cfg = experiment(tmp_path)
    run_experiment(cfg)
    exp = json.loads((tmp_path / "var" / "experiment.json").read_text())
    assert {s["name"] for s in exp["stages"]} == {"simclr", "simclr@px32", "classification", "classification@px32"}
    (rec,) = exp["recommendations"]["classification"]
    ranked = {a["init"] for a in rec["ranking"]}
    assert ranked == {"scratch", "simclr", "scratch@px32", "simclr@px32"}  # one ranking over both architectures
    assert rec["unavailable"] == ["imagenet@px32"]  # cbr_tiny has no ImageNet weights: reported, never random
    cell = json.loads((tmp_path / "var" / "finetune" / "classification" / "simclr@px32" / "linear" / "0.05" / "seed0"
                       / "results.json").read_text())
    assert cell["status"] == "complete" and cell["config"]["data"]["image_size"] == 32
    combined = (tmp_path / "var" / "reports" / "classification" / "report.md").read_text()
    assert "simclr@px32" in combined and "['data.image_size=32'] applied last" in combined
