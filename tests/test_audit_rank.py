"""The audit that ranks: fixed-budget discriminator score, per-class metrics, class grids, the ranking rule
(medpretrain.audit) and scripts/audit_synthetic.py with several labelled fake sets on real PneumoniaMNIST."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpretrain import audit
from medpretrain.config import DataConfig
from medpretrain.data import build_dataset
from medpretrain.data.errors import DataError
from medpretrain.generative.sampling import save_npz
from medpretrain.images import save_grid

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "audit_synthetic.py"


def test_fixed_budget_score_orders_noise_levels_where_the_auc_is_one():
    """fake = real + noise of three scales: the held-out AUC is 1.000 for all three, the loss still orders them."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen) / 32**0.5

    def draw(n: int) -> torch.Tensor:  # the "real" features: a correlated Gaussian in R^32
        return torch.randn(n, 32, generator=gen) @ mix.T

    real = draw(400)
    fakes = {sigma: draw(400) + sigma * torch.randn(400, 32, generator=gen) for sigma in (4.0, 8.0, 16.0)}
    scores = {sigma: audit.fixed_budget_discriminator(real, fake, n=400, seed=0) for sigma, fake in fakes.items()}
    for sigma, s in scores.items():
        assert f"{s.auc:.3f}" == "1.000", (sigma, s.auc)  # the AUC saturates: it cannot rank these three
        assert s.n_per_side == 400 and len(s.fold_loss) == 5
    losses = [scores[s].loss for s in (4.0, 8.0, 16.0)]
    assert losses[0] > losses[1] > losses[2] > 0, losses  # less noise = harder to tell apart = higher loss
    se = max(s.loss_sd for s in scores.values()) / math.sqrt(5)  # fold-to-fold spread of a mean of 5 folds
    assert min(losses[0] - losses[1], losses[1] - losses[2]) > 2 * se, (losses, se)
    # Real against real: about chance (ln 2), far above every fake set.
    base = audit.fixed_budget_discriminator(real, draw(400), n=400, seed=0)
    assert 0.6 < base.loss < 0.9 and abs(base.auc - 0.5) < 0.1 and base.loss > 3 * losses[0], (base, losses)
    assert base.js_lower_bound == pytest.approx(math.log(2) - base.loss)
    # Deterministic: the same inputs and seed give the same numbers.
    assert audit.fixed_budget_discriminator(real, fakes[8.0], n=400, seed=0) == scores[8.0]
    with pytest.raises(ValueError, match="at least 10"):
        audit.fixed_budget_discriminator(real[:8], real[:8], folds=5)


def clusters(per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian clusters in R^4, ``per_class`` points each."""
    centres = torch.tensor([[0.0, 0, 0, 0], [20.0, 0, 0, 0], [0.0, 20, 0, 0]])
    labels = torch.arange(3).repeat_interleave(per_class)
    return centres[labels] + torch.randn(3 * per_class, 4, generator=gen), labels


def test_per_class_prdc_of_copies_and_of_a_class_given_another_class_images():
    gen = torch.Generator().manual_seed(0)
    real, real_labels = clusters(80, gen)
    names = ["a", "b", "c"]
    # Fakes: copies of the reals of their class, except class "c", whose fakes are copies of class "a" reals.
    fake = torch.cat([real[real_labels == 0], real[real_labels == 1], real[real_labels == 0]])
    fake_labels = torch.arange(3).repeat_interleave(80)
    got = audit.per_class_metrics(real, real_labels, fake, fake_labels, names, n=40, k=3, kid_subsets=5,
                                  kid_subset_size=20)
    assert list(got) == names and all(got[c]["n_per_side"] == 40 and got[c]["k"] == 3 for c in names)
    for c in ("a", "b"):
        assert got[c]["fake"]["precision"] > 0.9 and got[c]["fake"]["recall"] > 0.9, got[c]
        assert got[c]["fake"]["coverage"] > 0.8 and got[c]["fake"]["fid"] < 2 * got[c]["real_baseline"]["fid"] + 0.5
    # Class c's fakes sit in class a's cluster, 20 units away: no real c neighbourhood holds one.
    assert got["c"]["fake"]["coverage"] < 0.1 < got["a"]["fake"]["coverage"]
    assert got["c"]["fake"]["precision"] < 0.1 and got["c"]["fake"]["fid"] > 100 * got["a"]["fake"]["fid"]
    # The real side is the same whatever the fakes: the baselines do not depend on them.
    other = audit.per_class_metrics(real, real_labels, fake[:100], fake_labels[:100], names, n=40, k=3,
                                    kid_subsets=5, kid_subset_size=20)
    assert other["a"]["real_baseline"] == got["a"]["real_baseline"]
    assert "skipped" in other["c"] and other["c"]["n_fake"] == 0  # no fakes of class c in the first 100
    assert other["b"]["n_per_side"] == 20  # 20 fakes of class b among the first 100


def test_fake_labels_are_read_and_checked_against_the_real_classes(tmp_path: Path):
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    classes = ["normal", "pneumonia"]
    ok = save_npz(tmp_path / "ok.npz", {"images": images, "labels": np.array([0, 0, 0, 1, 1, 1]),
                                        "class_names": np.array(classes)})
    assert audit.load_fake_labels(ok, 6, classes).tolist() == [0, 0, 0, 1, 1, 1]
    plain = save_npz(tmp_path / "plain.npz", {"images": images})
    assert audit.load_fake_labels(plain, 6, classes) is None and audit.load_fake_labels(plain, 6, None) is None
    (tmp_path / "run").mkdir()
    save_npz(tmp_path / "run" / "samples.npz", {"images": images, "labels": np.arange(6) % 2})
    assert audit.load_fake_labels(tmp_path / "run", 6, classes).tolist() == [0, 1, 0, 1, 0, 1]
    bad = {
        "range.npz": ({"labels": np.array([0, 1, 2, 0, 1, 2])}, classes, r"labels 0\.\.2 lie outside .*2 classes"),
        "names.npz": ({"labels": np.zeros(6, np.int64), "class_names": np.array(["a", "b"])}, classes,
                      r"class_names \['a', 'b'\] do not match"),
        "float.npz": ({"labels": np.zeros(6)}, classes, r"'labels' must be integers \[6\]"),
        "short.npz": ({"labels": np.zeros(5, np.int64)}, classes, r"'labels' must be integers \[6\]"),
        "unlabelled_real.npz": ({"labels": np.zeros(6, np.int64)}, None, "no single-label classes"),
    }
    for name, (arrays, real_classes, message) in bad.items():
        path = save_npz(tmp_path / name, {"images": images, **arrays})
        with pytest.raises(DataError, match=message) as err:
            audit.load_fake_labels(path, 6, real_classes)
        assert str(err.value).startswith(str(path.resolve())) and "\n" not in str(err.value)


def test_class_grid_has_a_real_and_a_fake_row_per_class(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.rand(30, 1, 10, 9, generator=gen) * 0.5, torch.rand(12, 1, 10, 9, generator=gen) * 0.5
    real_labels = torch.arange(30) % 3
    fake_labels = torch.tensor([0] * 7 + [1] * 5)  # class 2 has no fakes
    rows = audit.class_grid(real, fake, 4, real_labels=real_labels, fake_labels=fake_labels, num_classes=3)
    assert rows.shape == (3 * 2 * 4, 1, 10, 9)
    png = Image.open(save_grid(rows, tmp_path / "class_grid.png", nrow=4, value_range=(0, 1)))
    assert png.size == (4 * (9 + 2) + 2, 3 * 2 * (10 + 2) + 2)  # (width, height): 2 px padding
    fake_rows = rows.view(3, 2, 4, 1, 10, 9)[:, 1]
    for c, members in ((0, fake[:7]), (1, fake[7:])):  # each fake row holds fakes of its class only
        assert all(any(torch.equal(x, m) for m in members) for x in fake_rows[c])
    assert bool((fake_rows[2] == 1).all())  # no fakes of class 2: a white row
    assert all(any(torch.equal(x, m) for m in real[real_labels == 2]) for x in rows.view(3, 2, 4, 1, 10, 9)[2, 0])
    plain = audit.class_grid(real, fake, 5)
    png = Image.open(save_grid(plain, tmp_path / "plain.png", nrow=5, value_range=(0, 1)))
    assert png.size == (5 * 11 + 2, 2 * 12 + 2)


def test_rank_audits_by_fixed_budget_loss_then_fid():
    def result(loss, fid):
        probe = {} if loss is None else {"fake": {"loss": loss}}
        return {"probe": probe, "distribution": {"fake": {"fid": fid}}}

    results = {"a": result(0.1204, 50.0), "b": result(0.30, 90.0), "c": result(0.1196, 40.0),
               "old": result(None, 1.0), "d": result(0.01, 5.0)}
    # b has the highest loss; a and c tie at 3 decimals (0.120), so FID decides (c); audits without the
    # score come last.
    assert audit.rank_audits(results) == ["b", "c", "a", "d", "old"]


# ------------------------------------------------------------------------------------------------
# The script: two labelled generators on real PneumoniaMNIST
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("audit_synthetic_rank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_synthetic_rank"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_script_ranks_two_labelled_generators(script, data_root, tmp_path):
    """Fakes = unseen real images with their labels (good) and the same images under strong noise (bad)."""
    val = build_dataset(DataConfig(root=str(data_root)), "val", normalize=False)
    pick = np.concatenate([np.flatnonzero(val.labels == 0)[:40], np.flatnonzero(val.labels == 1)[:80]])
    images = torch.stack([val[int(i)]["image"] for i in pick])[:, 0]
    labels = val.labels[pick].astype(np.int64)
    noisy = (images + 0.4 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    names = np.array(val.class_names)
    for name, x in (("good", images), ("bad", noisy)):
        save_npz(tmp_path / f"{name}.npz", {"images": (x * 255).round().to(torch.uint8).numpy(), "labels": labels,
                                            "class_names": names})
    out = tmp_path / "audit"
    args = [f"data.root={data_root}", "backbone=scratch", "arch=cbr_tiny", f"out={out}", "n_real=100",
            "disc.epochs=1", "disc.folds=2", "disc.batch_size=32", "kid_subsets=5", "kid_subset_size=40",
            "memo.n_train=600", "memo.n_heldout=100", "probe.n=100"]
    r = script.main([*args, f"fakes=[{tmp_path / 'bad.npz'}, {tmp_path / 'good.npz'}]"])
    assert r["ranking"]["order"] == ["good", "bad"]
    good, bad = r["audits"]["good"], r["audits"]["bad"]
    assert good["probe"]["fake"]["loss"] > bad["probe"]["fake"]["loss"]
    assert good["probe"]["n_per_side"] == bad["probe"]["n_per_side"] == 100
    assert good["distribution"]["n_per_side"] == bad["distribution"]["n_per_side"] == 100
    # Per class, on the same real sides for both generators: both classes have numbers, noise scores worse.
    assert list(good["per_class"]) == ["normal", "pneumonia"]
    for c in ("normal", "pneumonia"):
        g, b = good["per_class"][c], bad["per_class"][c]
        # per class, the fewest fakes of that class in either set (40 normal, 80 pneumonia), at most n_real
        # and half the reals of the class
        fewest = {"normal": 40, "pneumonia": 80}[c]
        assert g["real_baseline"] == b["real_baseline"] and g["n_per_side"] == min(fewest, g["n_real"] // 2) >= 20
        assert g["fake"]["fid"] < b["fake"]["fid"] and g["fake"]["coverage"] > b["fake"]["coverage"]
    for name in ("good", "bad"):
        png = Image.open(out / name / "class_grid.png")
        assert png.size == (8 * 30 + 2, 2 * 2 * 30 + 2)  # 2 classes: a real and a fake row each
        md = (out / name / "audit.md").read_text()
        assert "fixed-budget discriminator loss" in md and "## Per class" in md and "| pneumonia |" in md
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["order"] == ["good", "bad"] and ranking["rule"] == audit.RANKING_RULE
    md = (out / "ranking.md").read_text()
    assert md.index("| 1 | good |") < md.index("| 2 | bad |")
    # Labels that do not fit the real classes: refused in one line naming the file.
    save_npz(tmp_path / "wrong.npz", {"images": (images * 255).to(torch.uint8).numpy(), "labels": labels + 1})
    with pytest.raises(DataError, match=r"wrong\.npz: labels 1\.\.2 lie outside"):
        script.main([*args, f"fake={tmp_path / 'wrong.npz'}", f"out={tmp_path / 'w'}"])


def test_experiment_report_orders_audits_by_the_ranking_rule(tmp_path: Path):
    """report.md's audit table: the fixed-budget loss column, rows best first; an old audit without it last."""
    import time

    from medpretrain.pipeline.report import write_report
    from medpretrain.pipeline.schema import ExperimentConfig
    from medpretrain.pipeline.stages import Stage

    def write(gen: str, loss: float | None, fid: float) -> Stage:
        d = {"fid": fid, "kid": 0.01, "precision": 0.5, "recall": 0.4}
        a = {"discriminator": {"auc": 1.0, "auc_ci95": [1.0, 1.0]}, "memorisation": {"n_flagged": 0},
             "distribution": {"fake": d, "real_baseline": {**d, "fid": 9.5}}, "fake": {"n_used": 500}}
        if loss is not None:
            a["probe"] = {"fake": {"loss": loss}, "real_baseline": {"loss": 0.70}}
        out = tmp_path / "audit" / gen / "audit.md"
        out.parent.mkdir(parents=True)
        (out.parent / "audit.json").write_text(json.dumps(a))
        return Stage(f"audit_{gen}", "h", str(out), status="run")

    stages = [write("old", None, 10.0), write("dcgan", 0.012, 900.0), write("vae", 0.251, 300.0),
              write("ddpm", 0.2508, 250.0)]
    report = write_report(ExperimentConfig(name="t"), tmp_path, stages, {}, time.time()).read_text()
    table = report[report.index("## Synthetic images (audit)"):report.index("## Stages")]
    assert audit.RANKING_RULE in table and "| fixed-budget D loss |" in table
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ") and "[audit.md]" in line]
    assert rows == ["ddpm", "vae", "dcgan", "old"]  # vae and ddpm tie at 0.251: the lower FID (ddpm) first
    assert "| ddpm | 1.000 [1.000, 1.000] | 0.251 (0.700) | 250.00 (9.50) |" in table and "| old | 1.000 [1.000, 1.000] | - |" in table
