"""benchmarks/bench_stage.py: one stage of an experiment timed on its own, with the experiment's own stage hash,
in a scratch folder (the experiment's folder untouched), and a fresh run each time (nothing reused)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from medpretrain.config import ConfigError, load_config
from medpretrain.pipeline.experiment import ExperimentConfig
from medpretrain.pipeline.stages import train_stage

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_stage", ROOT / "benchmarks" / "bench_stage.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_stage"] = bench
spec.loader.exec_module(bench)


def tiny(tmp_path: Path) -> Path:
    exp = {"name": "tiny", "out_dir": str(tmp_path / "exp"),
           "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny", "backbone.stem=standard"],
           "launch": {"launcher": "python"},
           "simclr": {"overrides": ["train.max_steps=3", "train.batch_size=16", "train.knn_every=-1",
                                   "train.checkpoint_every=2"]},
           "moco": {"enabled": False}, "vae": {"enabled": False}, "dcgan": {"enabled": False},
           "classification": {"enabled": False}, "audit": {"enabled": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_a_stage_is_timed_alone_with_the_experiments_own_hash(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    planned = train_stage(load_config(ExperimentConfig, ["--config", str(config), "dry_run=true"]),
                          tmp_path / "exp" / "tiny", "simclr")
    argv = [f"experiment={config}", "stage=simclr", f"work_dir={tmp_path / 'work'}", f"out_dir={tmp_path / 'res'}",
            "budget_min=20"]
    out = bench.main(argv)
    assert out["hash"] == planned.hash and out["status"] == "run" and out["met"] is True
    assert out["steps"] == 3 and out["wall_s"] > 0
    assert not (tmp_path / "exp").exists()  # the experiment's own folder is not touched
    written = json.loads((tmp_path / "res" / "stage_tiny_simclr.json").read_text())
    assert written["hash"] == planned.hash and written["overrides"][0] == "train.max_steps=3"
    md = (tmp_path / "res" / "stage_tiny_simclr.md").read_text()
    assert f"| simclr | `{planned.hash}` | 3 |" in md and "| 20 | yes |" in md and "> " not in md
    again = bench.main([*argv[:-1], "budget_min=0.0001", "note=beside x"])  # runs again (nothing reused)
    assert again["status"] == "run" and again["hash"] == planned.hash and again["met"] is False
    assert "| **no** |" in (md := (tmp_path / "res" / "stage_tiny_simclr.md").read_text()) and "\n> beside x\n" in md


def test_an_unknown_stage_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a training stage"):
        bench.main([f"experiment={tiny(tmp_path)}", "stage=resnet", f"work_dir={tmp_path / 'w'}"])
