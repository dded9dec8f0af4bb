"""Self-supervised methods as parts: the registry, MoCo's split-batch BatchNorm, and every added method run end
to end through ``accelerate launch pretrain/train.py method=<name>`` on real PneumoniaMNIST (cbr_tiny, 28 px,
batch 16): its export loads into a classifier with exact keys, the kNN monitor runs, the loss moves, and
``--init <name>`` finds the export.

Adding a method: its module under ``medpretrain/methods/``, its ``configs/<name>.yaml``, and its name in
:data:`ADDED`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain_e2e import launch, loss_rows, read_csv

from medpretrain.backbones import build_backbone
from medpretrain.config import ConfigError, load_config
from medpretrain.methods import selfsup_methods, stage, stages
from medpretrain.methods.base import METHODS, method_spec
from medpretrain.methods.moco import MoCo, MoCoMethodConfig, split_forward
from medpretrain.utils import PROJECT_ROOT

ADDED: list[str] = ["byol", "vicreg", "barlowtwins", "dino"]
"""Methods added after SimCLR and MoCo, each trained by the generic entry ``pretrain/train.py``. DenseCL's end to
end run is in ``tests/test_densecl.py`` instead (in process, on DRIVE patches: 5 s against 18 s for a launch)."""

TINY = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=4", "train.log_every=1",
        "train.checkpoint_every=0", "train.knn_every=0"]


def test_registry_lists_every_method_with_its_entry_yaml_and_schema():
    names = selfsup_methods()
    assert names[:2] == ("simclr", "moco") and set(ADDED) <= set(names)
    assert set(names) == set(METHODS)  # every selfsup stage is a method of the table, and back
    assert {"vae", "dcgan"} <= set(stages()) and not {"vae", "dcgan"} & set(names)
    for name in names:
        info, spec = stage(name), method_spec(name)
        assert info.kind == "selfsup" and info.out_dir == f"runs/pretrain/{name}"
        assert info.script == (f"pretrain/{name}.py" if name in ("simclr", "moco") else "pretrain/train.py")
        assert (PROJECT_ROOT / info.script).is_file() and (PROJECT_ROOT / info.config).is_file()
        module, _, cls = info.schema.partition(":")
        assert getattr(sys.modules[module], cls) is spec.config
        cfg = load_config(spec.config, [], defaults_file=PROJECT_ROOT / info.config)  # the YAML fits the schema
        assert cfg.out_dir == info.out_dir and hasattr(cfg, name)


def test_momentum_methods_move_every_target_by_the_cosine_schedule():
    """Every method with momentum copies (MoCo, BYOL, DenseCL, DINO) lists them in ``momentum_pairs``: the
    targets carry no gradient, and one update moves each towards its online module by exactly
    ``m = cosine_schedule(step, total, cfg.momentum, 1)`` (lightly's ``update_momentum``)."""
    import dataclasses

    from lightly.utils.scheduler import cosine_schedule

    from medpretrain.methods.base import MomentumMethod

    momentum = [n for n in selfsup_methods() if issubclass(METHODS[n].method, MomentumMethod)]
    assert {"moco", "byol", "densecl", "dino"} <= set(momentum)
    for name in momentum:
        spec = METHODS[name]
        group = next(f for f in dataclasses.fields(spec.config) if f.name == name).default_factory()
        torch.manual_seed(0)
        method = spec.method(build_backbone("cbr_tiny", 1, "small"), group, 1)
        assert method.momentum_pairs, name
        step, total = 3, 10
        before, online = {}, {}
        for src, dst in method.momentum_pairs:
            assert not any(p.requires_grad for p in getattr(method, dst).parameters()), (name, dst)
            with torch.no_grad():
                for p in getattr(method, src).parameters():
                    p.add_(torch.randn_like(p))  # online and target now differ
            before[dst] = [p.detach().clone() for p in getattr(method, dst).parameters()]
            online[dst] = [p.detach().clone() for p in getattr(method, src).parameters()]
        method.before_step(step, total)
        m = cosine_schedule(step, total, group.momentum, 1.0)
        assert group.momentum < m < 1.0
        for _, dst in method.momentum_pairs:
            for p, b, o in zip(getattr(method, dst).parameters(), before[dst], online[dst], strict=True):
                torch.testing.assert_close(p.detach(), m * b + (1 - m) * o)


def test_init_module_reads_the_registry():
    from medpretrain import init

    assert init.SELFSUP_METHODS == selfsup_methods()
    assert init.PRETRAIN_METHODS == tuple(stages()) and set(init.NAMED_INITS) >= {"selfsup", *stages()}
    for name in ADDED:
        assert init._CREATE_COMMAND[name] == (f"python pretrain/train.py method={name}  "
                                              f"(writes runs/pretrain/{name}/<run>/backbone.safetensors)")


def test_generic_entry_needs_a_method(tmp_path):
    cmd = [sys.executable, str(PROJECT_ROOT / "pretrain" / "train.py"), f"out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: pretrain/train.py needs method=<name> (one of {', '.join(selfsup_methods())})")
    proc = subprocess.run([*cmd, "method=nope"], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "error: unknown method 'nope'; known: simclr, moco" in proc.stderr


def test_split_forward_normalises_each_group_with_its_own_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(12, 3, 5, 5) * torch.arange(1, 13).view(12, 1, 1, 1)
    out = split_forward(bn, x, 3)
    ref = torch.cat([(c - c.mean((0, 2, 3), keepdim=True)) / (c.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                + bn.eps).sqrt() for c in x.chunk(3)])
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, bn(x), atol=1e-2)  # full-batch statistics differ


def test_moco_split_bn_auto_is_on_for_one_process_only():
    def groups(split_bn, processes):
        backbone = build_backbone("cbr_tiny", 1, "small")
        return MoCo(backbone, MoCoMethodConfig(queue_size=32, split_bn=split_bn), processes).bn_groups

    assert (groups("auto", 1), groups("auto", 2), groups(False, 1), groups(True, 2)) == (8, 1, 1, 8)
    torch.manual_seed(0)
    on = MoCo(build_backbone("cbr_tiny", 1, "small"), MoCoMethodConfig(queue_size=32, bn_splits=4), 1)
    off = MoCo(build_backbone("cbr_tiny", 1, "small"), MoCoMethodConfig(queue_size=32, split_bn=False), 1)
    off.load_state_dict(on.state_dict())
    x = torch.randn(16, 1, 28, 28)
    on.before_step(0, 10)
    keys = on.key(x)
    # Each key is its own image's: the groups are unshuffled back into the batch order.
    expected = torch.cat([on.key_encoder(c) for c in x[on_perm(0, 16)].chunk(4)])[torch.argsort(on_perm(0, 16))]
    assert torch.allclose(keys, expected.float(), atol=1e-5)
    assert not torch.allclose(keys, off.key(x), atol=1e-3)  # split statistics change the keys
    assert torch.allclose(off.key(x), off.key_encoder(x), atol=1e-5)  # off: one process, shuffle is a no-op


def test_moco_refuses_a_queue_above_half_the_pretraining_images():
    moco = MoCo(build_backbone("cbr_tiny", 1, "small"), MoCoMethodConfig(queue_size=9), 1)
    moco.check_data(18)  # exactly half: accepted
    moco.check_data(19)
    with pytest.raises(ConfigError, match=r"^moco.queue_size=9 is not well below the 17 pretraining images: at "
                                          r"most 8 \(half of them\)"):
        moco.check_data(17)
    with pytest.raises(ConfigError, match="queue_size=36 .* the 18 pretraining images: at most 9"):
        MoCo(build_backbone("cbr_tiny", 1, "small"), MoCoMethodConfig(queue_size=36), 1).check_data(18)


def test_moco_refuses_the_queue_in_the_loop_before_any_step(tmp_path, data_root):
    """Through the entry script: PneumoniaMNIST's 3882 training images take a queue of 1941, not 1942."""
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "pretrain" / "moco.py"), *TINY, "moco.queue_size=1942",
                           f"out_dir={tmp_path}", "run_name=q"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MEDPRETRAIN_DATA": str(data_root)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: moco.queue_size=1942 is not well below the 3882 pretraining images: at most 1941 (half of them), "
        "or the queue holds stale keys of the images being contrasted")
    assert not list(tmp_path.glob("q/checkpoints/*"))


def test_shipped_moco_configs_keep_the_queue_below_half_the_pretraining_images():
    """Every experiment file that trains MoCo, and configs/moco.yaml on its own data, pass :meth:`MoCo.check_data`
    with the number of images their pretraining split holds."""
    from medpretrain.data import build_dataset
    from medpretrain.methods.moco import MAX_QUEUE_FRACTION
    from medpretrain.methods.registry import stage as stage_info
    from medpretrain.pipeline.experiment import ExperimentConfig
    from medpretrain.pipeline.stages import data_of, stage_config

    info = stage_info("moco")
    cases = {"configs/moco.yaml": stage_config(info, info.config, [])}
    for path in sorted((PROJECT_ROOT / "configs" / "experiments").glob("*.yaml")):
        exp = load_config(ExperimentConfig, ["--config", str(path)])
        if exp.moco.enabled:
            cases[path.name] = stage_config(info, exp.moco.config or info.config, [*exp.common, *exp.moco.overrides])
    assert {"drive_full.yaml", "busi_full.yaml", "pneumonia.yaml"} <= set(cases)  # drive.yaml: DenseCL, no MoCo
    for name, conf in cases.items():
        n = len(build_dataset(data_of(conf), conf["split"], unlabeled=True, normalize=False))
        assert conf["moco"]["queue_size"] <= n * MAX_QUEUE_FRACTION, (name, conf["moco"]["queue_size"], n)


def on_perm(step: int, n: int) -> torch.Tensor:
    """The permutation :class:`MoCo` draws for its key groups at ``step`` (its own generator)."""
    g = torch.Generator().manual_seed((torch.initial_seed() + step * 0x9E3779B1) % 2**63)
    return torch.randperm(n, generator=g)


@pytest.fixture(scope="module", params=ADDED)
def method_run(request, tmp_path_factory, data_root) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    proc = launch("train.py", [f"method={name}", *TINY, f"out_dir={out}", "run_name=ref"], data_root)
    assert f"backbone: {out / 'ref' / 'backbone.safetensors'}" in proc.stdout
    return name, out / "ref"


@pytest.mark.slow
def test_added_method_trains_exports_and_monitors(method_run):
    from medpretrain.checkpoint import load_backbone, read_meta

    name, run = method_run
    for f in ("backbone.safetensors", "config.yaml", "metrics.csv", "loss.png"):
        assert (run / f).is_file(), f
    assert list((run / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    meta = read_meta(run / "backbone.safetensors")
    assert (meta.method, meta.steps, meta.arch, meta.image_size) == (name, 4, "cbr_tiny", 28)
    assert name in meta.config and meta.config["train"]["max_steps"] == 4
    # The export loads with exactly the backbone's keys (load_backbone refuses missing/unexpected ones).
    backbone, _ = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    classifier = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 2)).eval()
    assert classifier(torch.randn(3, 1, 28, 28)).shape == (3, 2)
    assert set(backbone.state_dict()) == set(build_backbone("cbr_tiny", 1, "small").state_dict())
    torch.manual_seed(0)
    fresh = build_backbone("cbr_tiny", 1, "small")
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), backbone.state_dict().values(),
                                                       strict=True))
    losses = loss_rows(run / "metrics.csv")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert max(losses.values()) - min(losses.values()) > 1e-4, f"the loss did not move: {losses}"
    knn = [float(r["knn_acc"]) for r in read_csv(run / "metrics.csv") if r["knn_acc"] != ""]
    assert len(knn) == 2 and all(0.5 < a <= 1.0 for a in knn)  # before training and at the end
    assert meta.extra["knn_acc"] == pytest.approx(knn[-1], abs=1e-5)
    # The monitor says what the accuracy means: the validation majority baseline (PneumoniaMNIST val: 0.742)
    # and balanced accuracy / AUC beside it.
    rows = [r for r in read_csv(run / "metrics.csv") if r["knn_acc"] != ""]
    assert [float(r["knn_majority"]) for r in rows] == pytest.approx([0.7424] * 2, abs=1e-3)
    assert all(0.5 < float(r["knn_auc"]) <= 1 and float(r["knn_balanced_acc"]) < float(r["knn_acc"]) for r in rows)
    assert meta.extra["knn_balanced_acc"] == pytest.approx(float(rows[-1]["knn_balanced_acc"]), abs=1e-5)


@pytest.mark.slow
def test_init_by_method_name_finds_the_export(method_run, tmp_path):
    from medpretrain.init import init_backbone

    name, run = method_run
    dst = tmp_path / "runs" / "pretrain" / name / "r1" / "backbone.safetensors"
    dst.parent.mkdir(parents=True)
    shutil.copy(run / "backbone.safetensors", dst)
    for init in (name, "selfsup"):
        backbone, info = init_backbone(init, "cbr_tiny", 1, "small", image_size=28, runs_dir=tmp_path / "runs")
        assert info.name == name and info.source == str(dst)
