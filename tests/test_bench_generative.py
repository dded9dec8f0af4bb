"""benchmarks/bench_generative.py: its numbers come from the experiment folder's records (no training): within-class
diversity catches a collapsed class that the mixed batch hides, the grid has a real row over the fake rows of each
class, the targets are judged from the audit's numbers, and a half-finished experiment is reported as such."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_generative", ROOT / "benchmarks" / "bench_generative.py")
bg = importlib.util.module_from_spec(spec)
sys.modules["bench_generative"] = bg
spec.loader.exec_module(bg)
spec_a = importlib.util.spec_from_file_location("bench_audit", ROOT / "benchmarks" / "bench_audit.py")
ba = importlib.util.module_from_spec(spec_a)
sys.modules["bench_audit"] = ba
spec_a.loader.exec_module(ba)


def _images(n: int, value: float | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.full((n, 1, 8, 8), value) if value is not None else torch.rand(n, 1, 8, 8, generator=g)


def test_within_class_diversity_sees_a_collapsed_class() -> None:
    real = _images(40, seed=1)
    real_labels = np.array([0, 1] * 20)
    # class 0: one image repeated (collapsed); class 1: as varied as the real images
    fake = torch.cat([_images(1, seed=2).expand(20, 1, 8, 8), _images(20, seed=3)])
    fake_labels = np.array([0] * 20 + [1] * 20)
    s = bg.sample_summary(fake, fake_labels, real, real_labels, ["normal", "pneumonia"])
    assert s["per_class"]["normal"]["diversity_ratio"] == 0.0
    assert 0.8 < s["per_class"]["pneumonia"]["diversity_ratio"] < 1.2
    assert s["diversity_ratio"] > 0.5  # the mixed set still looks varied
    assert s["n_fake"] == 40 and s["n_real"] == 40
    assert s["histogram_l1"] == pytest.approx(bg.histogram_l1(fake, real))
    same = bg.histogram_l1(real, real)
    assert same == 0.0 and bg.histogram_l1(torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)) == pytest.approx(2.0)


def test_class_grid_rows_and_file(tmp_path: Path) -> None:
    real = torch.cat([_images(5, 0.1), _images(5, 0.9)])
    real_labels = np.array([0] * 5 + [1] * 5)
    fake = torch.cat([_images(3, 0.2), _images(8, 0.8)])
    fake_labels = np.array([0] * 3 + [1] * 8)
    tiles = bg.class_rows(real, real_labels, fake, fake_labels, ["a", "b"], columns=4, fake_rows=2)
    assert tiles.shape == (2 * (4 + 8), 1, 8, 8)
    vals = tiles[:, 0, 0, 0]
    # class a: 4 real (0.1), then 3 fakes (0.2) and 5 blank tiles; class b: 4 real (0.9), 8 fakes (0.8)
    assert torch.allclose(vals[:4], torch.tensor(0.1)) and torch.allclose(vals[4:7], torch.tensor(0.2))
    assert torch.allclose(vals[7:12], torch.tensor(1.0)) and torch.allclose(vals[12:16], torch.tensor(0.9))
    assert torch.allclose(vals[16:], torch.tensor(0.8))
    path = tmp_path / "g.png"
    size = bg.save_class_grid(tiles, path, columns=4, scale=2, max_kb=200)
    assert size == path.stat().st_size
    with Image.open(path) as im:  # 6 rows, 4 columns of 16 px tiles with 2 px borders
        assert im.size == (2 + 4 * 18, 2 + 6 * 18) and im.mode == "L"
        assert np.asarray(im)[2, 2] == round(0.1 * 255)
    with pytest.raises(ValueError, match="over grid_max_kb"):
        bg.save_class_grid(torch.rand(400, 1, 28, 28), tmp_path / "big.png", columns=20, scale=4, max_kb=1)


def _audit(fid: float, base: float, recall: float, coverage: float, memorised: int, probe: float) -> dict:
    dist = {"fid": fid, "kid": 0.01, "precision": 0.7, "recall": recall, "density": 0.8, "coverage": coverage}
    rb = {"fid": base, "kid": 0.0, "precision": 0.95, "recall": 0.95, "density": 1.0, "coverage": 0.95}
    return {"fake": {"n_used": 100}, "distribution": {"n_per_side": 100, "fake": dist, "real_baseline": rb},
            "backbone": {"init": "simclr", "arch": "resnet18"},
            "discriminator": {"auc": 0.9, "auc_ci95": [0.88, 0.92]},
            "probe": {"fake": {"loss": probe, "loss_sd": 0.01}, "real_baseline": {"loss": 0.7}},
            "memorisation": {"n_flagged": memorised},
            "per_class": {"normal": {"n_per_side": 50, "n_real": 300, "fake": dist, "real_baseline": rb},
                          "odd": {"skipped": "too few"}}}


def test_targets_from_the_audit_numbers() -> None:
    cfg = bg.BenchConfig()
    a = bg.audit_summary(_audit(fid=40.0, base=10.0, recall=0.6, coverage=0.49, memorised=0, probe=0.3))
    assert a["fid_ratio"] == 4.0 and list(a["per_class"]) == ["normal"] and a["real_per_class"] == {"normal": 300}
    t = {x["target"]: x["met"] for x in bg.targets(a, cfg)}
    assert t == {"FID <= 5 x real-vs-real baseline": True, "recall >= 0.5": True, "coverage >= 0.5": False,
                 "memorised <= 0": True}
    b = bg.audit_summary(_audit(fid=50.5, base=10.0, recall=0.5, coverage=0.5, memorised=1, probe=0.3))
    assert [x["met"] for x in bg.targets(b, cfg)] == [False, True, True, False]


def test_an_unfinished_experiment_from_its_stage_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bg, "PROJECT_ROOT", tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "generative_toy", "out_dir": "out", "title": "Toy",
                                      "dcgan": {"overrides": ["loss=hinge"]}}))
    exp_dir = tmp_path / "out" / "generative_toy"
    for gen, fid, probe in (("dcgan", 30.0, 0.2), ("ddpm", 20.0, 0.4)):
        run_dir = exp_dir / gen / "h"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"steps": 10, "epochs": 1, "train_wall_s": 5.0}))
        adir = exp_dir / "audit" / gen
        adir.mkdir(parents=True)
        (adir / "audit.json").write_text(json.dumps(_audit(fid, 10.0, 0.6, 0.6, 0, probe)))
        (exp_dir / "stages").mkdir(exist_ok=True)
        for name, out, wall in ((gen, run_dir / "generator.safetensors", 120.0), (f"audit_{gen}", adir / "audit.md", 9.0)):
            (exp_dir / "stages" / f"{name}.json").write_text(json.dumps(
                {"name": name, "hash": "h", "output": str(out), "status": "run", "wall_s": wall}))
    # an earlier invocation's experiment.json (no ddpm in it) does not make this one finished
    (exp_dir / "experiment.json").write_text(json.dumps({"stages": [{"name": "dcgan", "hash": "h"}], "synthetic": [1]}))
    assert not bg.finished(json.loads((exp_dir / "experiment.json").read_text()), bg.stage_records(exp_dir))
    # a grid's per-class synthetic samples are recorded but never listed in experiment.json: not a sign of an
    # unfinished invocation (the generative_pneumonia run of 2026-12-02 was reported unfinished for it)
    listed = {"stages": [{"name": n, "hash": "h"} for n in ("dcgan", "audit_dcgan", "ddpm", "audit_ddpm")]}
    per_class = {"name": "samples_ddpm_per_class", "hash": "p", "status": "run"}
    assert bg.finished(listed, {**bg.stage_records(exp_dir), "samples_ddpm_per_class": per_class})
    assert not bg.finished(listed, {**bg.stage_records(exp_dir), "samples_ddpm": {**per_class, "name": "samples_ddpm"}})
    # bench_stage.py's records: the ddpm's (same hash) is shown, the dcgan's (another config's hash) is not
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for gen, h in (("ddpm", "h"), ("dcgan", "other")):
        (results / f"stage_generative_toy_{gen}.json").write_text(json.dumps(
            {"hash": h, "wall_s": 90.0, "loadavg_after": [1.24, 1.0, 1.0]}))
    cfg = bg.BenchConfig(targets_for="generative_toy")
    e = bg.read_experiment(config, cfg, {"generative_toy": {"ddpm": "lungs"}})
    assert e["generators"]["dcgan"]["alone"] is None and e["generators"]["ddpm"]["alone"]["wall_s"] == 90.0
    assert not e["finished"] and e["synthetic"] == []
    assert e["ranking"] == ["ddpm", "dcgan"] and e["best"] == "ddpm"  # higher fixed-budget D loss first
    assert e["generators"]["dcgan"]["overrides"] == ["loss=hinge"] and e["generators"]["ddpm"]["observation"] == "lungs"
    assert math.isclose(e["compute_s"], 2 * 129.0)
    assert all(t["met"] for t in e["targets"]["ddpm"])
    md = "\n".join(bg.experiment_markdown(e))
    assert "has not finished" in md and "**ddpm**" in md and "| ddpm | 0.400 (0.700) |" in md
    assert "| 1 | 2.0 | 1.5 (load 1.2) |" in md and "| 1 | 2.0 | - |" in md  # wall-clock, then timed alone
    assert "all targets met" in md and "By eye" not in md  # no grid without samples
    assert "normal 300 (100%)" in md


def test_audit_bench_reads_the_experiment_audits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ba, "PROJECT_ROOT", tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "generative_toy", "out_dir": "out", "title": "Toy"}))
    exp_dir = tmp_path / "out" / "generative_toy"
    (exp_dir / "stages").mkdir(parents=True)
    for gen, probe in (("vae", 0.3), ("ddpm", 0.5)):
        a = _audit(40.0, 10.0, 0.6, 0.6, 0, probe)
        a.update(code_version="x", wall_s=12.0, per_image=[{"i": 0}],
                 config={"knn_k": 5, "disc": {"folds": 3, "epochs": 3, "regime": "full"},
                         "memo": {"rule": "both", "quantile": 0.01}},
                 real={"dataset": "toy", "train_split": "train", "n_train": 600, "heldout_split": "val", "n_heldout": 50})
        a["backbone"]["source"] = str(tmp_path / "simclr.safetensors")
        a["probe"].update(hidden=64, steps=200, n_per_side=100, folds=5)
        a["discriminator"]["auc_ci95"] = [0.8, 0.9]
        (exp_dir / "audit" / gen).mkdir(parents=True)
        (exp_dir / "audit" / gen / "audit.json").write_text(json.dumps(a))
        (exp_dir / "stages" / f"audit_{gen}.json").write_text(json.dumps(
            {"name": f"audit_{gen}", "output": str(exp_dir / "audit" / gen / "audit.md"), "wall_s": 12.0}))
    e = ba.read_audits(config)
    assert e["ranking"] == ["ddpm", "vae"] and "per_image" not in e["audits"]["vae"]["audit"]
    md = "\n".join(ba.experiment_markdown(e))
    assert "| ddpm | 0.500 ± 0.010 (0.700) | 0.900 [0.800, 0.900] | 40.00 (10.00) |" in md
    assert "normal (n=50): FID / recall / coverage" in md and "`out/generative_toy/audit/ddpm/audit.md`" in md
