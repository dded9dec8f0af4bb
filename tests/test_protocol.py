"""The fine-tuning protocol (issue 14): budgets in optimiser steps, the LR schedule in steps, the operating point
chosen on validation and applied to test, seeds that set head init and batch order, batched fine-tuning
augmentation that keeps image and mask aligned, and the same hyper-parameters for every init.

Runs are tiny (cbr_tiny, a few steps) on real PneumoniaMNIST / DRIVE; numbers are checked against
recomputations from the saved outputs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.augment import TRAIN_AUGMENT_LEVELS, TrainAugment, TrainAugmentConfig
from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import load_state_dict
from medpretrain.config import ConfigError, DataConfig, load_config
from medpretrain.data import build_dataset
from medpretrain.finetune import (
    Budget,
    FinetuneConfig,
    OptimConfig,
    StepBatches,
    budget_of,
    build_optimizer,
    build_scheduler,
    build_seg_dataloaders,
    main_in_process,
    train_loader,
)
from medpretrain.metrics import (
    classification_metrics,
    dice_threshold,
    operating_threshold,
    parse_threshold_rule,
    per_image_metrics,
)
from medpretrain.regimes import Classifier, parse_regime
from medpretrain.results import read_results
from medpretrain.stats import youden_threshold

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", str(ROOT / "configs/finetune.yaml"), "backbone.arch=cbr_tiny", "optim.batch_size=32",
        "optim.eval_batch_size=512", "n_bootstrap=20"]


def _run(tmp: Path, name: str, *extra: str):
    out = tmp / name
    assert main_in_process([*TINY, f"output_dir={out}", *extra]) == 0
    res = read_results(out / "results.json")
    assert res is not None and res.status == "complete"
    return res, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two label fractions, one step budget (4 steps, validation every 2), light augmentation, seed 0."""
    tmp = tmp_path_factory.mktemp("protocol")
    common = ("optim.steps=4", "optim.eval_every=2", "optim.augment=light", "eval.threshold=youden")
    return {f: _run(tmp, f"f{f}", f"data.label_fraction={f}", *common) for f in (0.05, 0.25)}


# ------------------------------------------------------------------------------------------------
# Budgets in steps
# ------------------------------------------------------------------------------------------------


def test_two_label_fractions_get_the_same_optimizer_steps(runs):
    (a, _), (b, _) = runs[0.05], runs[0.25]
    assert a.data["train_size"] == 194 and b.data["train_size"] == 971  # 5% and 25% of 3882, stratified
    assert a.optimizer_steps == b.optimizer_steps == 4
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history] == [2, 4]  # validation every 2 steps
    assert a.epochs_run == b.epochs_run == 2
    # Best checkpoint on validation: the selected period is the arg-max of the validation AUC.
    for res in (a, b):
        aucs = [h["val_auc"] for h in res.history]
        assert res.best_epoch == int(np.argmax(aucs)) + 1
        assert res.metrics["val_best"]["auc"] == pytest.approx(max(aucs), abs=1e-6)


def test_epochs_mode_still_ties_steps_to_the_fraction():
    """``optim.steps=0`` keeps the older protocol: the steps follow the loader's length."""
    assert budget_of(OptimConfig(epochs=3), loader_len=5) == Budget(15, 5, 3, False)
    assert budget_of(OptimConfig(epochs=3), loader_len=50) == Budget(150, 50, 3, False)
    assert budget_of(OptimConfig(epochs=3, max_steps_per_epoch=2), loader_len=50) == Budget(6, 2, 3, False)
    # A step budget is the same for any loader length; eval_every 0 -> ten validations.
    assert budget_of(OptimConfig(steps=95), 5) == budget_of(OptimConfig(steps=95), 500) == Budget(95, 10, 10, True)
    b = budget_of(OptimConfig(steps=10, eval_every=4), 3)
    assert (b.periods, [b.steps_in(p) for p in (1, 2, 3)], b.steps_before(3)) == (3, [4, 4, 2], 8)
    with pytest.raises(ConfigError, match="optim.steps"):
        OptimConfig(steps=-1)


def test_step_batches_cycle_over_small_data_in_seeded_passes():
    budget = Budget(total_steps=7, period_steps=3, periods=3, in_steps=True)
    s = StepBatches(n=5, batch_size=4, budget=budget, seed=3)
    batches = []
    for period in (1, 2, 3):
        s.period = period
        assert len(s) == [3, 3, 1][period - 1]
        batches += list(s)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    stream = np.concatenate(batches)  # 28 draws = 5 full passes + 3: each pass a permutation of range(5)
    for p in range(5):
        assert sorted(stream[5 * p: 5 * p + 5].tolist()) == [0, 1, 2, 3, 4]
    expected = np.random.default_rng(np.random.SeedSequence([3, 1])).permutation(5)
    assert stream[5:10].tolist() == expected.tolist()
    # Two processes: two batches per step, the first process's share is the even ones.
    two = StepBatches(n=5, batch_size=4, budget=budget, seed=3, num_processes=2)
    assert len(two) == 6 and list(two)[0] == batches[0]


def test_class_balance_draws_every_class_about_equally_on_the_real_split():
    """optim.class_balance on real PneumoniaMNIST (train split 10% normal): the batches of a step budget draw the
    normal class about half the time; without it, about 10%; the draws depend only on (seed, pass)."""
    args = [*TINY, "optim.steps=200", "optim.eval_every=100"]
    plain = load_config(FinetuneConfig, args)
    balanced = load_config(FinetuneConfig, [*args, "optim.class_balance=true"])
    ds = build_dataset(plain.data, "train", seed=0)
    labels = np.asarray(ds.labels)
    assert round(float((labels == 0).mean()), 3) == 0.100  # 388 of 3882

    def normal_share(cfg: FinetuneConfig) -> tuple[float, list[list[int]]]:
        sampler = train_loader(ds, cfg).batch_sampler
        batches = []
        for period in (1, 2):
            sampler.period = period
            batches += list(sampler)
        assert len(batches) == 200 and all(len(b) == 32 for b in batches)
        return float((labels[np.concatenate(batches)] == 0).mean()), batches

    share_plain, _ = normal_share(plain)
    share_bal, batches = normal_share(balanced)
    assert abs(share_plain - 0.100) < 0.01 and abs(share_bal - 0.5) < 0.02  # 6400 draws: sd of the share 0.006
    assert normal_share(balanced)[1] == batches  # reproducible (a resumed run draws the same batches)
    w = StepBatches(4, 2, Budget(2, 2, 1, True), seed=1, weights=np.array([0.0, 1.0, 0.0, 1.0]))
    assert set(np.concatenate(list(w)).tolist()) <= {1, 3}  # zero weight: never drawn
    with pytest.raises(ValueError, match="weights"):
        StepBatches(4, 2, Budget(2, 2, 1, True), seed=1, weights=np.zeros(4))
    with pytest.raises(ConfigError, match="step budget"):
        OptimConfig(class_balance=True)
    seg = load_config(FinetuneConfig, ["--config", str(ROOT / "configs/finetune_drive.yaml"), "optim.steps=4",
                                       "optim.class_balance=true", "seg.n_train_images=1"])
    with pytest.raises(ConfigError, match="single-label classification"):
        build_seg_dataloaders(seg)


def test_segmentation_budgets_get_the_same_steps():
    counts = {}
    for n in (1, 5):
        cfg = load_config(FinetuneConfig, ["--config", str(ROOT / "configs/finetune_drive.yaml"),
                                           f"seg.n_train_images={n}", "optim.steps=7", "optim.eval_every=3",
                                           "optim.batch_size=4", "seg.patches_per_image=2"])
        sampler = build_seg_dataloaders(cfg)["loaders"]["train"].batch_sampler
        total = 0
        for period in range(1, budget_of(cfg.optim, 0).periods + 1):
            sampler.period = period
            total += sum(1 for _ in sampler)
        counts[n] = (total, sampler.n)
    assert counts == {1: (7, 2), 5: (7, 10)}


# ------------------------------------------------------------------------------------------------
# LR schedule in steps
# ------------------------------------------------------------------------------------------------


def _lrs(optim: OptimConfig, at: list[int]) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    sched = build_scheduler(opt, optim)
    out, done = [], 0
    for t in at:
        while done < t:
            opt.step()
            sched.step()
            done += 1
        out.append(opt.param_groups[0]["lr"])
    return out


def test_step_decay_milestones_are_fractions_of_the_steps():
    optim = OptimConfig(steps=200, lr=0.1, milestones=[0.5, 0.75], gamma=0.1)
    assert _lrs(optim, [0, 99, 100, 149, 150, 199]) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule_in_steps():
    optim = OptimConfig(steps=100, lr=0.2, schedule="cosine")
    got = _lrs(optim, [0, 25, 50, 75, 100])
    want = [0.5 * 0.2 * (1 + math.cos(math.pi * t / 100)) for t in (0, 25, 50, 75, 100)]
    assert got == pytest.approx(want, abs=1e-9)
    assert want[1] == pytest.approx(0.2 * 0.853553, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Operating points chosen on validation
# ------------------------------------------------------------------------------------------------


def test_threshold_rules_parse_and_fail_in_one_line():
    assert parse_threshold_rule("youden") == ("youden", None)
    assert parse_threshold_rule("0.3") == ("fixed", 0.3) and parse_threshold_rule(0.7) == ("fixed", 0.7)
    assert parse_threshold_rule("sensitivity:0.9") == ("sensitivity", 0.9)
    assert parse_threshold_rule("specificity:0.8") == ("specificity", 0.8)
    for bad in ("yuden", "sens:0.9", "1.5", "specificity:2"):
        with pytest.raises(ValueError, match="threshold rule"):
            parse_threshold_rule(bad)
    with pytest.raises(ConfigError, match="eval.threshold"):
        load_config(FinetuneConfig, ["eval.threshold=median"])


def test_operating_threshold_per_task():
    val_p = np.array([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    val_y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert operating_threshold(val_p, val_y, "binary") == (0.75, "youden on validation")
    assert operating_threshold(val_p, val_y, "binary", "0.5") == (0.5, "fixed 0.5")
    thr, rule = operating_threshold(val_p, val_y, "binary", "sensitivity:0.5")
    assert (thr, rule) == (pytest.approx(0.85), "sensitivity >= 0.5 on validation")  # highest with 2 of 4 found
    assert operating_threshold(val_p, np.ones(8, int), "binary")[0] == 0.5  # one class: Youden undefined
    # Multi-label: one threshold per label, each from its own column; multi-class: arg-max.
    ml_p = np.stack([val_p, val_p - 0.25], 1)
    ml_y = np.stack([val_y, val_y], 1)
    thr, rule = operating_threshold(ml_p, ml_y, "multilabel")
    assert thr == [0.75, pytest.approx(0.5)] and rule == "youden on validation (per label)"
    assert operating_threshold(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0]), "multiclass") == (None, "argmax")
    # Per-label thresholds give the metrics of the per-label decisions; AUC is unchanged by them.
    m = classification_metrics(ml_p, ml_y, "multilabel", threshold=thr)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 1.0)
    one = classification_metrics(ml_p, ml_y, "multilabel", threshold=0.62)
    assert one["specificity"] == pytest.approx((0.5 + 1) / 2)  # one threshold: label 0 calls 0.65, 0.7 positive
    assert one["sensitivity"] == pytest.approx((1 + 0.25) / 2)  # and label 1 finds only 0.65
    assert m["auc"] == classification_metrics(ml_p, ml_y, "multilabel")["auc"]


def test_test_metrics_use_the_threshold_chosen_on_validation(runs):
    """The run's threshold is Youden's on the validation predictions of the selected weights, and the test
    sensitivity / specificity are those at that threshold, neither at 0.5 nor at the test-optimal one.

    Mutation check (by hand, recorded here): choosing the threshold on the test predictions in
    ``finetune/run.py`` (``parts.choose_threshold(test)`` in place of ``(val)``) fails this test: the run's
    threshold is then test's Youden threshold, 0.5986, not validation's, 0.5947. Thresholding test at 0.5
    (``parts.evaluate(test)`` without the threshold) fails it too: test sensitivity 1.0 / specificity 0.0
    instead of 0.872 / 0.560.
    """
    res, out = runs[0.05]
    cfg = load_config(FinetuneConfig, [*TINY, "data.label_fraction=0.05"])
    # Validation predictions of the saved (selected) weights.
    state, meta = load_state_dict(out / "model.safetensors")
    backbone = build_backbone("cbr_tiny", 1, meta["stem"])
    model = Classifier(backbone, 2)
    model.load_state_dict(state)
    model.eval()
    val = build_dataset(cfg.data, "val")
    with torch.no_grad():
        x = torch.stack([val[i]["image"] for i in range(len(val))])
        val_p = model(x).softmax(1)[:, 1].numpy()
    val_y = np.asarray(val.labels)
    t_val = youden_threshold(val_p, val_y)
    assert res.threshold == pytest.approx(t_val, abs=1e-6) and res.threshold_rule == "youden on validation"
    assert res.metrics["val_best"] == pytest.approx(classification_metrics(val_p, val_y, "binary", threshold=t_val),
                                                    abs=1e-5)

    pred = np.load(out / "predictions.npz")
    test_p, test_y = pred["test_probs"], pred["test_labels"]
    t_test = youden_threshold(test_p, test_y)
    at = {t: classification_metrics(test_p, test_y, "binary", threshold=t) for t in (t_val, 0.5, t_test)}
    # The case is one where the three operating points differ (the train prior is 90 % pneumonia).
    assert abs(t_val - 0.5) > 0.05 and abs(t_test - t_val) > 1e-4
    assert (at[t_val]["sensitivity"], at[t_val]["specificity"]) != (at[0.5]["sensitivity"], at[0.5]["specificity"])
    assert (at[t_val]["sensitivity"], at[t_val]["specificity"]) != (at[t_test]["sensitivity"],
                                                                    at[t_test]["specificity"])
    assert res.metrics["test"] == pytest.approx(at[t_val], abs=1e-6)


def test_dice_threshold_maximises_mean_validation_dice():
    rng = np.random.default_rng(0)
    masks = [(rng.random((20, 24)) < 0.2).astype(np.float32) for _ in range(3)]
    # Foreground scored around 0.35, background around 0.15: the best cut is well below 0.5.
    probs = [np.clip(np.where(m > 0, 0.35, 0.15) + rng.normal(0, 0.05, m.shape), 0, 1) for m in masks]
    rois = [np.ones_like(m) for m in masks]
    t = dice_threshold(probs, masks, rois)
    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    mean_dice = {g: np.mean([r["dice"] for r in per_image_metrics(probs, masks, rois, threshold=g)]) for g in grid}
    assert t == max(grid, key=lambda g: (mean_dice[g], -abs(g - 0.5)))
    assert 0.2 <= t <= 0.3 and mean_dice[t] > mean_dice[0.5] + 0.5


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------


def test_seed_sets_head_init(tmp_path):
    """lr = 0: the saved head is the head as initialised. Same seed -> identical; another seed -> different."""
    heads = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _, out = _run(tmp_path, name, f"seed={seed}", "optim.lr=0", "optim.steps=1", "data.label_fraction=0.01",
                      "optim.augment=none")
        heads[name] = load_state_dict(out / "model.safetensors")[0]["head.weight"]
    assert torch.equal(heads["a"], heads["b"])
    assert not torch.allclose(heads["a"], heads["c"])


def test_seed_sets_batch_order():
    ds = list(range(100))

    def order(seed: int) -> list[list[int]]:
        cfg = FinetuneConfig(seed=seed, optim=OptimConfig(steps=6, eval_every=6, batch_size=16))
        return [b.tolist() for b in train_loader(ds, cfg)]

    assert order(0) == order(0) and len(order(0)) == 6
    assert order(0) != order(1)
    # Epochs mode: the loader's generator is seeded by seed too.
    def epoch_order(seed: int) -> list[int]:
        cfg = FinetuneConfig(seed=seed, optim=OptimConfig(batch_size=100))
        return next(iter(train_loader(ds, cfg))).tolist()

    assert epoch_order(2) == epoch_order(2) != epoch_order(3)


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------


def test_augmentation_keeps_image_and_mask_aligned():
    """A synthetic mask equals the thresholded image after the same (random, per-sample) transform."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 1, 33, 34, generator=g) > 0.7).float()
    mask[:, :, 10:20, 5:25] = 1.0  # a block, so rotations and shifts move something visible
    image = (mask - 0.5) / 0.5  # the image is the mask, normalised
    cfg = dataclasses.replace(TRAIN_AUGMENT_LEVELS["strong"], brightness=0.0, contrast=0.0)
    aug = TrainAugment(cfg=cfg, mean=0.5, std=0.5)
    out = aug({"image": image, "mask": mask, "roi": torch.ones_like(mask), "label": torch.arange(6)},
              torch.Generator().manual_seed(1))
    raw = out["image"] * 0.5 + 0.5
    assert torch.equal((raw > 0.5).float(), out["mask"])
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0} and torch.equal(out["label"], torch.arange(6))
    moved = (out["mask"] != mask).flatten(1).any(1)
    assert bool(moved.all())  # every sample was transformed (strong: rotation up to 20 degrees)
    # Per-sample geometry: two samples with the same input come out differently.
    same = aug({"image": image[:1].repeat(2, 1, 1, 1), "mask": mask[:1].repeat(2, 1, 1, 1)},
               torch.Generator().manual_seed(2))
    assert not torch.equal(same["mask"][0], same["mask"][1])


def test_augmentation_levels():
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    batch = {"image": x, "label": torch.zeros(4, dtype=torch.long)}
    assert TrainAugment("none")(batch) is batch  # today's behaviour: nothing drawn, nothing changed
    light = TrainAugment("light", mean=0.5, std=0.5)(batch, torch.Generator().manual_seed(0))
    again = TrainAugment("light", mean=0.5, std=0.5)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(light["image"], again["image"]) and not torch.equal(light["image"], x)
    assert light["image"].shape == x.shape
    raw = light["image"] * 0.5 + 0.5
    assert float(raw.min()) >= -1e-6 and float(raw.max()) <= 1 + 1e-6  # intensity stays on the [0, 1] scale
    # Intensity only: brightness and contrast move the mean / spread, not the geometry.
    photo = TrainAugment(cfg=TrainAugmentConfig(brightness=0.3), mean=0.5, std=0.5)
    y = photo({"image": torch.full((2, 1, 4, 4), 0.0)}, torch.Generator().manual_seed(0))["image"]
    assert torch.allclose(y, y[:, :, :1, :1].expand_as(y)) and not torch.allclose(y, torch.zeros_like(y))
    with pytest.raises(ValueError, match="augment level"):
        TrainAugment("heavy")


# ------------------------------------------------------------------------------------------------
# Same hyper-parameters for every init
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mult", [1.0, 0.1])
def test_same_learning_rates_for_scratch_and_pretrained(mult):
    groups = {}
    for init in ("scratch", "runs/simclr/export/backbone.safetensors"):
        torch.manual_seed(0)
        model = Classifier(build_backbone("cbr_tiny", 1, "small"), 2)
        cfg = FinetuneConfig(init=init, optim=OptimConfig(lr=1e-3, backbone_lr_mult=mult))
        opt, _, info = build_optimizer(model, parse_regime("full"), cfg, "small")
        groups[init] = (sorted(g["lr"] for g in opt.param_groups), info.backbone_lr, info.head_lr)
    assert groups["scratch"] == groups["runs/simclr/export/backbone.safetensors"]
    assert groups["scratch"][1] == pytest.approx(1e-3 * mult) and groups["scratch"][2] == 1e-3


def test_defaults_and_shipped_configs_give_every_init_the_same_hyper_parameters():
    assert OptimConfig().backbone_lr_mult == 1.0 and DataConfig().subset_seed is None
    for name in ("finetune.yaml", "finetune_busi.yaml", "finetune_drive.yaml"):
        cfg = load_config(FinetuneConfig, ["--config", str(ROOT / "configs" / name)])
        assert cfg.optim.backbone_lr_mult == 1.0, name
        assert cfg.optim.steps > 0 and cfg.optim.augment == "light", name


def test_lr_axis_runs_every_init_at_every_lr(tmp_path):
    """``lrs``: each init gets each LR in its own folder; the LR is in the cell's config for the report."""
    from medpretrain.finetune import output_dir
    from medpretrain.pipeline.grid import CompareConfig, cell_config, grid

    cfg = CompareConfig(base_config=str(ROOT / "configs/finetune.yaml"), inits=["scratch", "simclr"],
                        regimes=["full"], label_fractions=[0.1], seeds=[0], lrs=[1e-3, 3e-4],
                        overrides=["optim.lr=0.5"], runs_dir=str(tmp_path))
    cells = [cell_config(a) for a in grid(cfg)]
    assert [(c.init, c.optim.lr) for c in cells] == [("scratch", 1e-3), ("scratch", 3e-4), ("simclr", 1e-3),
                                                     ("simclr", 3e-4)]
    dirs = {output_dir(c) for c in cells}
    assert len(dirs) == 4 and tmp_path / "finetune/classification/scratch/full/lr0.0003/0.1/seed0" in dirs
    # Without the axis: one cell per init at the base LR, the folder layout of before.
    plain = [cell_config(a) for a in grid(CompareConfig(**{**cfg.__dict__, "lrs": []}))]
    assert [c.optim.lr for c in plain] == [0.5, 0.5]
    assert output_dir(plain[0]) == tmp_path / "finetune/classification/scratch/full/0.1/seed0"
