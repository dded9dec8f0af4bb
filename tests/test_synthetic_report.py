"""The experiment report's "scratch + synthetic - scratch" comparison (issue 17)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from medpretrain.config import load_config
from medpretrain.pipeline.report import synthetic_comparisons, synthetic_markdown
from medpretrain.pipeline.schema import ExperimentConfig


def _result(init: str, frac: float, seed: int, auc: float, ci: float = 0.01) -> dict:
    return {"status": "complete", "init_label": init, "regime": "full", "label_fraction": frac, "seed": seed,
            "metrics": {"test": {"auc": auc}, "val_best": {"auc": auc}},
            "ci": {"auc": {"low": auc - ci, "high": auc + ci}}, "timing": {"mean_epoch_s": 1.0},
            "data": {"train_size": 10}}


def _cfg(tmp_path: Path):
    exp = {"name": "syn", "variants": [
        {"name": "synvae", "overrides": ["data.synthetic=stage:vae:400", "data.synthetic_ratio=1.0"],
         "inits": ["scratch"]},
        {"name": "wide", "overrides": ["data.image_size=48"], "inits": ["scratch"]}]}
    path = tmp_path / "syn.yaml"
    path.write_text(yaml.safe_dump(exp))
    return load_config(ExperimentConfig, ["--config", str(path)])


def test_synthetic_arm_against_its_base_per_budget(tmp_path: Path) -> None:
    results = [*[_result("scratch", 0.1, s, v) for s, v in enumerate([0.80, 0.81, 0.82])],
               *[_result("scratch@synvae", 0.1, s, v) for s, v in enumerate([0.85, 0.86, 0.87])],
               *[_result("scratch", 0.01, s, v) for s, v in enumerate([0.70, 0.74, 0.72])],
               *[_result("scratch@synvae", 0.01, s, v) for s, v in enumerate([0.69, 0.75, 0.71])],
               # another variant's arm (no data.synthetic) and a budget the base lacks: no rows
               *[_result("scratch@wide", 0.1, s, 0.9) for s in range(3)],
               _result("scratch@synvae", 1.0, 0, 0.9)]
    rows = synthetic_comparisons(_cfg(tmp_path), results)
    assert [(r["arm"], r["base"], r["budget"]) for r in rows] == [("scratch@synvae", "scratch", 0.01),
                                                                   ("scratch@synvae", "scratch", 0.1)]
    low, high = rows
    # 10%: per-seed gaps all +0.05 (no seed spread but rounding); test-set sd per arm 0.01 / 1.96 from its CIs,
    # arms independent without predictions -> se sqrt(2) * 0.01 / 1.96
    assert math.isclose(high["gap"], 0.05, abs_tol=1e-9)
    assert math.isclose(high["se"], math.sqrt(2) * 0.01 / 1.959963984540054, rel_tol=1e-4)
    assert 0 < high["ci"][0] < 0.05 - 1.95 * high["se"] and math.isclose(sum(high["ci"]) / 2, 0.05, abs_tol=1e-9)
    assert high["verdict"] == "helps" and high["n"] == [3, 3] and high["synthetic"] == "stage:vae:400"
    assert math.isclose(high["arm_mean"], 0.86) and math.isclose(high["base_mean"], 0.81)
    # 1%: gaps -0.01, +0.01, -0.01 -> mean -0.0033, well inside the seed spread
    assert math.isclose(low["gap"], -0.01 / 3, abs_tol=1e-9) and low["verdict"] == "not distinguishable"
    md = "\n".join(synthetic_markdown(rows))
    assert ("| scratch@synvae - scratch | `stage:vae:400` | full | 0.1 | 0.860 (n=3) | 0.810 (n=3) | "
            f"+0.050 [{high['ci'][0]:+.3f}, {high['ci'][1]:+.3f}] |") in md and "| helps |" in md
    assert synthetic_markdown([]) == []


def test_no_synthetic_variant_no_rows(tmp_path: Path) -> None:
    results = [_result("scratch", 0.1, 0, 0.8), _result("scratch@wide", 0.1, 0, 0.9)]
    cfg = _cfg(tmp_path)
    cfg.variants = [v for v in cfg.variants if v.name == "wide"]
    assert synthetic_comparisons(cfg, results) == []
