"""Pretraining replicates (issue 14, item 3): an arm pretrained with several seeds, and the grid pairing fine-tune
seeds with replicates, so the seed spread of a cell includes the pretraining's."""

from __future__ import annotations

from pathlib import Path

import yaml

from medpretrain.config import load_config
from medpretrain.pipeline.experiment import ExperimentConfig
from medpretrain.pipeline.grid import grid, replicate
from medpretrain.pipeline.stages import grid_config, train_stage


def test_replicate_pairs_seed_number_with_a_pretraining_run() -> None:
    assert replicate("simclr=/a|/b", 0) == "simclr=/a"
    assert replicate("simclr=/a|/b", 1) == "simclr=/b"
    assert replicate("simclr=/a|/b", 2) == "simclr=/a"  # k mod n
    assert replicate("simclr=/a", 3) == "simclr=/a" and replicate("scratch", 1) == "scratch"


def test_each_replicate_is_its_own_stage_and_each_fine_tune_seed_starts_from_one(tmp_path: Path) -> None:
    exp = {"name": "rep", "out_dir": str(tmp_path), "dry_run": True,
           "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny"],
           "simclr": {"seeds": [0, 1]}, "moco": {"enabled": False}, "vae": {"enabled": False},
           "dcgan": {"enabled": False},
           "classification": {"enabled": True, "inits": ["scratch", "simclr"],
                              "grid": ["label_fractions=[0.1]", "seeds=[0, 1, 2]", "regimes=[full]"]}}
    (tmp_path / "rep.yaml").write_text(yaml.safe_dump(exp))
    cfg = load_config(ExperimentConfig, ["--config", str(tmp_path / "rep.yaml")])
    exp_dir = tmp_path / "rep"
    reps = [train_stage(cfg, exp_dir, "simclr", seed=s) for s in cfg.simclr.seeds]
    assert [r.name for r in reps] == ["simclr_seed0", "simclr_seed1"]
    assert reps[0].hash != reps[1].hash and reps[0].output != reps[1].output  # the seed is in the config hash
    ccfg = grid_config(cfg, exp_dir, "classification", {"simclr": reps})
    inits = {}
    for argv in grid(ccfg):
        opts = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
        if opts.get("init_name") == "simclr":
            inits[int(opts["seed"])] = opts["init"]
    assert inits == {0: reps[0].output, 1: reps[1].output, 2: reps[0].output}
