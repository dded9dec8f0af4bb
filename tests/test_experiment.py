"""scripts/run_experiment.py (medpretrain.pipeline): stage reuse, resume after a kill, two CPU processes, configs, the answer."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medpretrain.checkpoint import read_meta
from medpretrain.config import HASH_NEUTRAL, ConfigError, DataConfig, hash_view, load_config
from medpretrain.data import data_stamp
from medpretrain.pipeline.experiment import ExperimentConfig, run_experiment
from medpretrain.report import recommend, recommendation_markdown

ROOT = Path(__file__).resolve().parent.parent

TINY_PRETRAIN = ["train.max_steps=4", "train.batch_size=32", "train.knn_every=-1", "train.log_every=1",
                 "train.checkpoint_every=2"]


def tiny_experiment(tmp_path: Path, launch: dict, name: str = "tiny") -> Path:
    """SimCLR (cbr_tiny, 4 steps) + a 2-cell linear-probe grid (scratch, simclr) on PneumoniaMNIST."""
    exp = {
        "name": name, "title": "tiny", "out_dir": str(tmp_path / "exp"),
        "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny", "backbone.stem=standard"],
        "launch": launch,
        "simclr": {"overrides": TINY_PRETRAIN},
        "moco": {"enabled": False}, "vae": {"enabled": False}, "dcgan": {"enabled": False},
        "classification": {"enabled": True, "inits": ["scratch", "simclr"],
                           "grid": ["label_fractions=[0.05]", "seeds=[0]", "regimes=[linear]"],
                           "overrides": ["optim.steps=0", "optim.epochs=1", "optim.batch_size=32", "optim.max_steps_per_epoch=2",
                                         "n_bootstrap=20"]},
        "audit": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def run(config: Path, env_extra: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_experiment.py"), str(config), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def stages(exp_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (exp_dir / "stages").glob("*.json")}


def test_killed_experiment_resumes_then_everything_is_reused(tmp_path: Path) -> None:
    config = tiny_experiment(tmp_path, {"launcher": "python"})
    exp_dir = tmp_path / "exp" / "tiny"

    # 1. SimCLR is killed right after step 3 (its checkpoint at step 2 is complete): the experiment stops
    #    with an error naming the stage and its log, and writes no report.
    first = run(config, {"MEDPRETRAIN_FAULT_EXIT_AT_STEP": "3"})
    assert first.returncode != 0
    assert "stage simclr failed" in first.stderr and "simclr.log" in first.stderr
    assert not (exp_dir / "report.md").exists()
    [run_dir] = [p for p in (exp_dir / "simclr").iterdir() if p.is_dir()]
    assert not (run_dir / "backbone.safetensors").exists()

    # 2. The same command continues from that checkpoint and ends with the planned number of steps.
    second = run(config)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    st = stages(exp_dir)
    assert st["simclr"]["status"] == "resumed"
    assert st["classification"]["status"] == "run"
    meta = read_meta(run_dir / "backbone.safetensors")
    assert meta.steps == 4 and meta.method == "simclr"
    assert "resumed from" in (exp_dir / "logs" / "simclr.log").read_text()
    results = [json.loads(p.read_text()) for p in (exp_dir / "finetune").rglob("results.json")]
    assert sorted(r["init_label"] for r in results) == ["scratch", "simclr"]
    assert all(r["status"] == "complete" for r in results)
    simclr_run = next(r for r in results if r["init_label"] == "simclr")
    assert simclr_run["init"] == str(run_dir / "backbone.safetensors")  # the experiment's own export
    report = (exp_dir / "report.md").read_text()
    assert "## Which initialisation? (classification)" in report
    # a winner, or (a 2-step probe can rank below chance) every cell flagged as failed, never shown as a finding
    assert "| 0.05 | **" in report or ("| 0.05 | - |" in report and "Failed cells, left out" in report)
    mtimes = {p: p.stat().st_mtime_ns for p in (exp_dir / "finetune").rglob("results.json")}
    from medpretrain.pipeline.report import readme_section  # README's results section, from experiment.json

    readme = "\n".join(readme_section(exp_dir, assets=tmp_path / "assets"))
    assert "### tiny" in readme and "| 0.05 | " in readme and "| scratch | linear | " in readme
    assert (tmp_path / "assets" / "tiny" / "classification_label_efficiency.png").stat().st_size > 1000

    # 3. Nothing changed: every stage is reused, no fine-tune cell recomputed.
    third = run(config)
    assert third.returncode == 0, third.stderr[-3000:]
    assert {s["status"] for s in stages(exp_dir).values()} == {"reused"}
    assert mtimes == {p: p.stat().st_mtime_ns for p in (exp_dir / "finetune").rglob("results.json")}

    # 4. A changed pretraining setting is a new stage (new hash), and its fine-tune cells are recomputed.
    exp = yaml.safe_load(config.read_text())
    exp["simclr"]["overrides"] = [o.replace("max_steps=4", "max_steps=2") for o in TINY_PRETRAIN]
    config.write_text(yaml.safe_dump(exp))
    plan = run(config, None, "dry_run=true")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "simclr: run - would run" in plan.stdout
    assert "classification: planned - 1 of 2 runs to do" in plan.stdout  # scratch is unchanged

    # 5. Run it: the grid's wall-clock is the part computed now plus the reused scratch cell's own seconds (one
    #    worker), so a partly recomputed grid is not reported as costing only its new cells.
    fourth = run(config)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    cls = stages(exp_dir)["classification"]
    scratch = next(r for r in (json.loads(p.read_text()) for p in (exp_dir / "finetune").rglob("results.json"))
                   if r["init_label"] == "scratch")
    kept = scratch["timing"]["total_s"]
    assert cls["status"] == "run" and "1 computed now" in cls["detail"]
    assert f"+ {kept:.0f} s of reused cells ({kept:.0f} s / 1 workers)" in cls["detail"]
    assert cls["wall_s"] > kept


def test_previous_wall_finds_a_stage_by_its_hash_under_another_name(tmp_path: Path) -> None:
    """A stage that became replicate ``simclr_seed0`` (a section given ``seeds: [0, ...]``) keeps the wall-clock
    it was measured with as ``simclr``; another hash, or no record, gives 0."""
    from medpretrain.pipeline.stages import previous_wall

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "simclr.json").write_text(json.dumps({"name": "simclr", "hash": "abc", "wall_s": 73.8}))
    (tmp_path / "stages" / "moco.json").write_text(json.dumps({"name": "moco", "hash": "def", "wall_s": 140.2}))
    assert previous_wall(tmp_path, "simclr_seed0", "abc") == 73.8
    assert previous_wall(tmp_path, "simclr", "abc") == 73.8
    assert previous_wall(tmp_path, "simclr_seed1", "xyz") == 0.0
    assert previous_wall(tmp_path / "missing", "simclr", "abc") == 0.0


def test_two_cpu_processes_end_to_end(tmp_path: Path) -> None:
    """The same tiny experiment with every stage and every fine-tune cell on 2 processes (torchrun, gloo)."""
    config = tiny_experiment(tmp_path, {"launcher": "torchrun", "args": ["--nproc_per_node", "2"]}, name="two")
    done = run(config, {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp_dir = tmp_path / "exp" / "two"
    [export] = (exp_dir / "simclr").glob("*/backbone.safetensors")
    meta = read_meta(export)
    assert meta.extra["processes"] == 2 and meta.steps == 4
    results = [json.loads(p.read_text()) for p in (exp_dir / "finetune").rglob("results.json")]
    assert len(results) == 2 and all(r["status"] == "complete" for r in results)
    assert all(r["timing"]["processes"] == 2 for r in results)
    for p in (exp_dir / "finetune").rglob("predictions.npz"):  # every test image scored once, none twice
        with np.load(p) as npz:
            assert len(npz["test_probs"]) == 624 and len(np.unique(npz["test_index"])) == 624
    summary = json.loads((exp_dir / "experiment.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["simclr", "classification"]


def test_refuses_to_run_as_several_orchestrators() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_experiment.py"), "x.yaml"],
                          capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"}, cwd=ROOT)
    assert done.returncode != 0 and "start it with python" in done.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_made_experiments_load_and_plan(path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every shipped experiment parses into the schema and plans its stages against the real data."""
    cfg = load_config(ExperimentConfig, ["--config", str(path)])
    assert cfg.name == path.stem
    assert cfg.classification.enabled or cfg.segmentation.enabled
    run_experiment(load_config(ExperimentConfig, ["--config", str(path), "dry_run=true",
                                                  "out_dir=/nonexistent/never-written"]), sys.stdout)
    out = capsys.readouterr().out
    assert "runs to do" in out
    assert not Path("/nonexistent/never-written").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_are_valid(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    expected = {"single": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "multi_node": "MULTI_GPU"}[path.stem]
    assert cfg.distributed_type.value == expected
    if path.stem == "multi_node":
        assert cfg.num_machines > 1 and cfg.main_process_ip


def test_data_stamp_follows_the_files(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 10).save(tmp_path / cls / "x.png")
    cfg = DataConfig(dataset=f"folder:{tmp_path}")
    first = data_stamp(cfg)
    assert data_stamp(cfg) == first
    Image.new("L", (8, 8), 200).save(tmp_path / "b" / "y.png")
    assert data_stamp(cfg) != first


def test_data_stamp_is_the_content_so_a_copy_with_new_times_keeps_it(tmp_path: Path, monkeypatch) -> None:
    """A fresh copy of the shared data (new mtimes, another root) keeps every stage reusable, the digests are
    stored without file names or paths, and a changed file is read again and changes the stamp."""
    import shutil

    import numpy as np
    from PIL import Image

    from medpretrain.data import dataset

    monkeypatch.setenv("MEDPRETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset, "_DIGESTS", {})
    rng = np.random.default_rng(0)
    for cls in ("benign_patient_x", "malignant"):
        (tmp_path / "a" / "data" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "a" / "data" / cls / "x.png")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # contents only: new mtimes
    f_a, f_b = (tmp_path / r / "data" / "malignant" / "x.png" for r in ("a", "b"))
    assert f_a.stat().st_mtime_ns != f_b.stat().st_mtime_ns

    def stamp(root: str) -> str:
        return data_stamp(DataConfig(dataset="folder:data", root=str(tmp_path / root)))

    first = stamp("a")
    assert stamp("b") == first
    store = (tmp_path / "cache" / dataset.DIGESTS_FILE).read_text()
    assert len(json.loads(store)) == 4
    assert "patient" not in store and "x.png" not in store and str(tmp_path) not in store
    monkeypatch.setattr(dataset, "_DIGESTS", {})  # another process: reads the store, not the files
    monkeypatch.setattr(dataset, "sha256_file", lambda f: pytest.fail(f"{f} read again"))
    assert stamp("a") == stamp("b") == first
    monkeypatch.undo()
    f_b.write_bytes(f_b.read_bytes()[:-1] + b"\x00")  # same size, new content and mtime
    assert stamp("b") != first and stamp("a") == first


def test_fingerprint_reuses_the_stamps_digests_and_keeps_its_value(tmp_path: Path, monkeypatch) -> None:
    """An export's dataset_hash (fingerprint) takes the digests data_stamp has stored instead of reading every
    file again, with the value it always had: sha256sum's 16 digits for one file, hash_files for several; an
    entry of the earlier 16-digit store is read once more."""
    from medpretrain.data import dataset
    from medpretrain.utils import hash_files, sha256_file

    monkeypatch.setattr(dataset, "_DIGESTS", {})
    files = []
    for i, name in enumerate(("b.bin", "a.bin", "c.bin")):
        (tmp_path / "d").mkdir(exist_ok=True)
        files.append(tmp_path / "d" / name)
        files[-1].write_bytes(bytes([i]) * (100 + i))
    store = tmp_path / "cache" / dataset.DIGESTS_FILE
    assert dataset.fingerprint(files, store) == hash_files(files) == dataset.fingerprint(files)
    assert dataset.fingerprint(files[:1], store) == sha256_file(files[0])[:16] == dataset.fingerprint(files[:1])
    assert sorted(v[2] for v in json.loads(store.read_text()).values()) == sorted(sha256_file(f) for f in files)
    monkeypatch.setattr(dataset, "_DIGESTS", {})  # another process: the store, not the files
    monkeypatch.setattr(dataset, "sha256_file", lambda f: pytest.fail(f"{f} read again"))
    assert dataset.fingerprint(files, store) == hash_files(files)
    assert dataset.file_digests(files, DataConfig(cache_dir=str(tmp_path / "cache"))) == [
        sha256_file(f)[:16] for f in files]
    monkeypatch.undo()
    monkeypatch.setattr(dataset, "_DIGESTS", {})
    old = {k: [*v[:2], v[2][:16]] for k, v in json.loads(store.read_text()).items()}  # the earlier store
    store.write_text(json.dumps(old))
    read: list[Path] = []
    monkeypatch.setattr(dataset, "sha256_file", lambda f: read.append(f) or sha256_file(f))
    assert dataset.fingerprint(files, store) == hash_files(files) and sorted(read) == sorted(files)


def _result(init: str, regime: str, seed: int, auc: float, ci: float = 0.01) -> dict:
    return {"status": "complete", "init_label": init, "regime": regime, "label_fraction": 0.1, "seed": seed,
            "metrics": {"test": {"auc": auc, "accuracy": auc}, "val_best": {"auc": auc}}, "ci": {"auc": {"low": auc - ci, "high": auc + ci}},
            "timing": {"mean_epoch_s": 1.0}, "data": {"train_size": 10}, "epochs_to_95": 1, "best_epoch": 1}


def test_recommend_ranks_inits_and_judges_the_gap() -> None:
    results = [
        *[_result("selfsup", "full", s, v) for s, v in enumerate([0.90, 0.91, 0.92])],
        *[_result("selfsup", "linear", s, v) for s, v in enumerate([0.70, 0.71, 0.72])],
        *[_result("scratch", "full", s, v) for s, v in enumerate([0.80, 0.81, 0.82])],
        {"status": "unavailable", "init_label": "imagenet", "regime": "full", "label_fraction": 0.1, "seed": 0},
    ]
    [row] = recommend(results)
    assert row["winner"]["init"] == "selfsup" and row["winner"]["regime"] == "full"
    assert row["runner_up"]["init"] == "scratch"
    assert math.isclose(row["margin"], 0.10, abs_tol=1e-9)
    # per-seed gaps all 0.10 (no seed spread); test-set sd per arm 0.01 / 1.96 from its CI, not divided by the
    # seeds (they share one test set), arms independent without predictions
    se = 0.01 / 1.959963984540054
    assert math.isclose(row["uncertainty"], math.sqrt(2) * se, rel_tol=1e-6)
    assert row["verdict"] == "clear" and not row["single_seed"]
    assert row["unavailable"] == ["imagenet"]
    md = "\n".join(recommendation_markdown([row]))
    assert "**selfsup** (full)" in md and "+0.100" in md and "imagenet" in md

    close = [_result("a", "full", s, v, ci=0.05) for s, v in enumerate([0.80, 0.86])]
    close += [_result("b", "full", s, v, ci=0.05) for s, v in enumerate([0.82, 0.83])]
    [row] = recommend(close)
    assert row["winner"]["init"] == "a" and row["verdict"] == "not distinguishable"
    [row] = recommend([_result("a", "full", 0, 0.9), _result("b", "full", 0, 0.6)])
    assert row["single_seed"] and row["verdict"] == "clear"
    [row] = recommend([_result("a", "full", 0, 0.9), _result("b", "full", 0, 0.5)])  # AUC 0.5: a failed cell
    assert row["verdict"] == "only one init" and row["failed_cells"][0]["init"] == "b"


def test_generator_samples_and_audit_stages(tmp_path: Path) -> None:
    """Conditional DCGAN (3 steps) -> 64 samples in the training images' class mix (audit.mix=data, the
    default) -> audit with its own discriminator trunk's features; then reused."""
    exp = {
        "name": "gen", "out_dir": str(tmp_path / "exp"),
        "common": ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny", "backbone.stem=standard"],
        "launch": {"launcher": "python"},
        "simclr": {"enabled": False}, "moco": {"enabled": False}, "vae": {"enabled": False},
        "dcgan": {"overrides": ["train.max_steps=3", "train.batch_size=32", "train.checkpoint_every=0",
                            "discriminator=backbone", "conditional=true"]},  # cbr_tiny trunk: the audit's features
        "audit": {"generators": ["dcgan"], "features": "dcgan", "n_samples": 64,
                  "overrides": ["n_real=64", "n_fake=64", "disc.epochs=1", "disc.folds=2", "kid_subsets=2",
                                "kid_subset_size=32", "memo.n_heldout=64", "memo.n_train=256"]},
    }
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(exp))
    first = run(config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    exp_dir = tmp_path / "exp" / "gen"
    st = stages(exp_dir)
    assert [st[k]["status"] for k in ("dcgan", "samples_dcgan", "audit_dcgan")] == ["run", "run", "run"]
    with np.load(st["samples_dcgan"]["output"]) as npz:
        assert npz["images"].shape == (64, 28, 28) and npz["images"].dtype == np.uint8
        drawn = np.bincount(npz["labels"], minlength=2).tolist()
    from medpretrain.checkpoint import load_state_dict

    _, meta = load_state_dict(Path(st["dcgan"]["output"]).with_name("generator.safetensors"))
    train = meta["class_counts"]  # the shared PneumoniaMNIST's training split: 388 normal, 3494 pneumonia
    normal = round(64 * train[0] / sum(train))
    assert 0 < train[0] < train[1] and drawn == [normal, 64 - normal] and normal < 32
    audit = json.loads(Path(st["audit_dcgan"]["output"]).with_name("audit.json").read_text())
    assert audit["fake"]["n_used"] == 64
    # 3-step DCGAN samples are told from real images every time (1.0 here; chance is 0.5 +- chance_sd)
    disc = audit["discriminator"]
    assert disc["auc"] > 0.9 and disc["auc"] > 0.5 + 5 * disc["chance_sd"], disc
    assert disc["auc"] == pytest.approx(np.mean(disc["fold_auc"])) and len(disc["fold_auc"]) == 2
    report = (exp_dir / "report.md").read_text()
    assert "## Synthetic images (audit)" in report and "| dcgan | " in report
    again = run(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s["status"] for s in stages(exp_dir).values()} == {"reused"}


def test_experiment_schema_has_a_section_per_registered_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method registered later gets an experiment section (off by default) with no pipeline edit."""
    from medpretrain.methods import registry
    from medpretrain.pipeline.experiment import _experiment_config

    registry.stages()  # the built-in methods are registered
    monkeypatch.setitem(registry._STAGES, "newmethod", registry.StageInfo(
        "newmethod", "selfsup", "pretrain/simclr.py", "configs/simclr.yaml", "runs/pretrain/newmethod"))
    schema = _experiment_config()
    cfg = load_config(schema, [])
    assert [cfg.simclr.enabled, cfg.moco.enabled, cfg.vae.enabled, cfg.dcgan.enabled] == [True] * 4
    assert cfg.newmethod.enabled is False
    on = load_config(schema, ["newmethod.enabled=true", "newmethod.overrides=[train.epochs=2]"])
    assert on.newmethod.enabled and on.newmethod.overrides == ["train.epochs=2"]
    with pytest.raises(ConfigError, match="newmethod.enable"):
        load_config(schema, ["newmethod.enable=true"])


def test_stage_config_is_validated_against_its_schema_and_hashed_resolved() -> None:
    from medpretrain.methods.registry import StageInfo
    from medpretrain.pipeline.stages import stage_config, stage_hash

    info = StageInfo("x", "generative", "generative/vae.py", "", "runs/x", schema="medpretrain.config:DataConfig")
    conf = stage_config(info, "", ["image_size=32"])
    # every key, defaults included, but the options added later at their neutral values (config.HASH_NEUTRAL)
    assert conf == {**hash_view(DataConfig()), "image_size": 32}
    assert set(dataclasses.asdict(DataConfig())) - set(conf) == set(HASH_NEUTRAL["DataConfig"])
    # Spelling a default out is the same config, so the same stage folder.
    assert stage_hash(stage_config(info, "", [])) == stage_hash(stage_config(info, "", ["channels=1"]))
    assert stage_hash(stage_config(info, "", [])) != stage_hash(conf)
    with pytest.raises(ConfigError, match="imagesize"):
        stage_config(info, "", ["imagesize=32"])
    with pytest.raises(ConfigError, match="image_size"):
        stage_config(info, "", ["image_size=big"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        stage_config(dataclasses.replace(info, schema="medpretrain.config:NoSuchConfig"), "", [])
    # Without a schema: the YAML file with the overrides merged in, nothing added.
    plain = dataclasses.replace(info, schema="")
    assert stage_config(plain, "configs/simclr.yaml", ["train.epochs=2"])["train"]["epochs"] == 2
    assert "image_size" not in stage_config(plain, "", ["data.dataset=x"])["data"]
