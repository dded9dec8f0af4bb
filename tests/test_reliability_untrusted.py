"""Reliability: untrusted files. Nothing is ever unpickled, YAML is read safely, configs cannot write
outside the chosen output directory.

A static scan (through ``ast``, so strings and comments do not count) of every Python file of the
repository, then behavioural checks with hostile files whose payload would leave a marker folder behind.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_record import record

from medpretrain.config import DataConfig
from medpretrain.data import DataError, clear_source_cache, read_source
from medpretrain.init import read_torchvision_state
from medpretrain.stage import resolve_run_dir

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", "runs", ".git", "build", "medpretrain.egg-info", "__pycache__"}


def python_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str) -> list[str]:
    """Calls that may unpickle or build Python objects from untrusted bytes, as ``"<line>: <reason>"``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}
                   for n in names):
                problems.append(f"{node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name == "torch.load" or (last == "load" and name.startswith("torch.")):
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{node.lineno}: {name}( without weights_only=True")
        elif name in {"yaml.load", "yaml.load_all"}:
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in {"SafeLoader", "CSafeLoader"}:
                problems.append(f"{node.lineno}: {name}( without a SafeLoader")
        elif name in {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}:
            problems.append(f"{node.lineno}: {name}(")
        elif name in {"np.load", "numpy.load"}:
            ap = _kw(node, "allow_pickle")
            if not (ap is None or (isinstance(ap, ast.Constant) and ap.value is False)):
                problems.append(f"{node.lineno}: {name}( with allow_pickle")
        elif last in {"loads", "load"} and name.split(".")[0] in {"pickle", "dill", "joblib", "marshal"}:
            problems.append(f"{node.lineno}: {name}(")
    return problems


def test_scanner_catches_what_it_must():
    bad = ("import pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\n"
           "yaml.load(s, Loader=yaml.FullLoader)\nyaml.unsafe_load(s)\nnp.load(p, allow_pickle=True)\n")
    assert len(unsafe_calls(bad)) == 7
    good = ("torch.load(f, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\nnp.load(p, allow_pickle=False)\nnp.load(p)\n"
            "x = 'torch.load(f)'\n")
    assert unsafe_calls(good) == []


def test_no_unsafe_deserialisation_in_the_repository():
    files = python_files()
    assert len(files) > 40 and ROOT / "medpretrain" / "init.py" in files
    found = {str(p.relative_to(ROOT)): unsafe_calls(p.read_text(encoding="utf-8")) for p in files}
    # The guard imports pickle only to replace its loaders with refusing ones; anything else there counts.
    guard = found.pop("tests/unsafe_load_guard.py")
    assert guard and all(g.endswith("imports a pickle module") for g in guard), guard
    found = {k: v for k, v in found.items() if v}
    assert found == {}
    record("untrusted files", f"static scan of {len(files)} Python files", "no torch.load without "
           "weights_only=True, no pickle, no unsafe yaml, no np.load allow_pickle")


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the proof that a loader executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pth_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth: cannot read as a torch state dict with "
                                         r"weights_only=True"):
        read_torchvision_state(path)
    assert not marker.exists()
    record("untrusted files", ".pth whose pickle runs os.mkdir", "refused by the ImageNet loader, code not run")


def test_npz_with_object_arrays_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    arrays = {f"{s}_{k}": np.zeros((2, 28, 28) if k == "images" else (2, 1), np.uint8)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    arrays["train_labels"] = np.array([Payload(marker), 1], dtype=object)
    np.savez(tmp_path / "pneumoniamnist_28.npz", **arrays)
    clear_source_cache()
    with pytest.raises(DataError, match=r"pneumoniamnist_28\.npz: not a readable \.npz file") as e:
        read_source(DataConfig(dataset="medmnist:pneumoniamnist", root=str(tmp_path)))
    assert "\n" not in str(e.value) and not marker.exists()
    record("untrusted files", ".npz with a pickled object array", "DataError, code not run")


@pytest.mark.parametrize("run_name", ["../escaped", "a/../../escaped", "/tmp/absolute-escape"])
def test_run_name_cannot_leave_out_dir(tmp_path, run_name):
    with pytest.raises(ValueError, match="escapes the output directory"):
        resolve_run_dir(str(tmp_path / "out"), run_name, "")
    assert resolve_run_dir(str(tmp_path / "out"), "fine/nested", "")[0] == tmp_path / "out" / "fine" / "nested"
    record("untrusted files", f"run_name={run_name}", "refused: escapes the output directory")


def test_script_refuses_escaping_run_name_before_writing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain/simclr.py"), f"out_dir={out}",
                           "run_name=../../escaped"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "escapes the output directory" in last, proc.stderr[-2000:]
    assert not (tmp_path.parent / "escaped").exists() and not out.exists()
    record("untrusted files", "pretrain/simclr.py run_name=../../escaped", "exit != 0 before writing anything")


# --------------------------------------------------------------------------------------------
# Checkpoints: resuming never unpickles (accelerate's custom_checkpoint_*.pkl are neither written nor read)
# --------------------------------------------------------------------------------------------


def test_training_state_round_trips_without_pickle(tmp_path):
    import collections
    import math

    from lightly.loss import NTXentLoss

    from medpretrain.generative.monitor import CollapseMonitor
    from medpretrain.resume import BufferState, Counter, load_training_state, save_training_state

    def objects(seed: int):
        torch.manual_seed(seed)
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.5)
        bank = NTXentLoss(memory_bank_size=(8, 4)).memory_bank
        bank.bank = torch.randn_like(bank.bank)  # the queue lives in non-persistent buffers
        return {"step": Counter(seed), "momentum_model": net, "scheduler": sched,
                "memory_bank": BufferState(bank, ["bank", "bank_ptr"]), "monitor": CollapseMonitor(0.3, 2)}

    saved = objects(7)
    for _ in range(2):
        saved["scheduler"].optimizer.step()
        saved["scheduler"].step()
    saved["memory_bank"].module.bank_ptr.fill_(5)
    saved["monitor"].update(float("nan"), 1.0)  # a NaN ratio must survive JSON
    path = save_training_state(tmp_path / "training_state.safetensors", saved, step=7)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, no pickle protocol byte

    loaded = objects(0)
    load_training_state(path, loaded)
    assert loaded["step"].value == 7
    for k, v in saved["momentum_model"].state_dict().items():
        assert torch.equal(loaded["momentum_model"].state_dict()[k], v)
    assert loaded["scheduler"].state_dict() == saved["scheduler"].state_dict()
    assert isinstance(loaded["scheduler"].milestones, collections.Counter)
    assert loaded["scheduler"].get_last_lr() == saved["scheduler"].get_last_lr() == [0.05]
    for n in ("bank", "bank_ptr"):
        assert torch.equal(getattr(loaded["memory_bank"].module, n), getattr(saved["memory_bank"].module, n))
    assert loaded["monitor"].strikes == 1 and math.isnan(loaded["monitor"].last_ratio)

    with pytest.raises(ValueError, match=r"training_state\.safetensors: training state holds .*missing \[\], "
                                         r"unexpected \['monitor'\]"):
        load_training_state(path, {k: v for k, v in objects(0).items() if k != "monitor"})

    class Opaque:
        def state_dict(self):
            return {"fn": print}

    with pytest.raises(TypeError, match=r"training state opaque\.fn: a builtin_function_or_method cannot be saved"):
        save_training_state(tmp_path / "x.safetensors", {"opaque": Opaque()}, step=0)


def test_resume_refuses_pickled_accelerate_state(tmp_path):
    """A checkpoint folder holding accelerate's ``custom_checkpoint_*.pkl`` (older format, or planted) is
    refused before accelerate is asked to load anything, and its payload never runs."""
    from medpretrain.resume import COMPLETE_MARKER, load_checkpoint

    ckpt = tmp_path / "checkpoints" / "checkpoint_0"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE_MARKER).write_text('{"step": 2}\n')
    marker = tmp_path / "PWNED"
    torch.save({"value": Payload(marker)}, ckpt / "custom_checkpoint_0.pkl")

    class NoAccelerator:
        def load_state(self, path):
            raise AssertionError("accelerate was asked to load a folder with pickled state")

    with pytest.raises(ValueError, match=r"checkpoint_0: holds pickled state \['custom_checkpoint_0\.pkl'\].*never "
                                         r"unpickled"):
        load_checkpoint(NoAccelerator(), ckpt, {})
    assert not marker.exists()
    record("untrusted files", "checkpoint folder with a custom_checkpoint_0.pkl whose pickle runs os.mkdir",
           "resume refused before loading, code not run")


GUARD = ROOT / "tests" / "unsafe_load_guard.py"


def guarded(log: Path, script: str | Path, args: list[str], cwd: Path,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, str(GUARD), str(log), str(script), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def guard_log(log: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_guard_catches_accelerates_pickled_custom_state(tmp_path):
    """The control for the resume tests below: with an object registered for checkpointing, accelerate's
    own ``load_state`` unpickles ``custom_checkpoint_0.pkl`` (``weights_only=False``) and the guard stops it."""
    script = tmp_path / "old_style.py"
    script.write_text(
        "import sys\nfrom accelerate import Accelerator\n\n"
        "class Step:\n    value = 3\n\n    def state_dict(self):\n        return {'value': self.value}\n\n"
        "    def load_state_dict(self, state):\n        self.value = state['value']\n\n"
        "acc = Accelerator(cpu=True)\nacc.register_for_checkpointing(Step())\n"
        "acc.save_state(sys.argv[1])\nacc.load_state(sys.argv[1])\n")
    log = tmp_path / "loads.jsonl"
    proc = guarded(log, script, [str(tmp_path / "ckpt")], tmp_path)
    assert proc.returncode != 0 and "UnsafeLoad" in proc.stderr, proc.stderr[-2000:]
    refused = [e for e in guard_log(log) if e["refused"]]
    assert [Path(e["file"]).name for e in refused] == ["custom_checkpoint_0.pkl"], guard_log(log)
    assert refused[0]["weights_only"] is False


PRETRAIN = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.max_steps=4", "train.log_every=1",
            "train.checkpoint_every=2", "train.knn_every=-1", "data.image_size=28", "moco.queue_size=64"]
FINETUNE = ["--config", str(ROOT / "configs" / "finetune.yaml"), "backbone.arch=cbr_tiny", "optim.steps=0", "optim.epochs=3",
            "optim.max_steps_per_epoch=2", "optim.batch_size=32", "optim.eval_batch_size=512", "n_bootstrap=20",
            "data.label_fraction=0.05", "init=scratch", "regime=full"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pretrain/moco.py", "finetune/run.py"])
def test_resume_never_unpickles(script, data_root, tmp_path):
    """A killed run resumes under the guard: every ``torch.load`` has ``weights_only=True``, nothing reaches
    pickle, and the checkpoints hold ``training_state.safetensors`` instead of ``custom_checkpoint_*.pkl``.
    MoCo carries a momentum encoder, its memory bank and the step counter; fine-tuning an LR scheduler
    (MultiStepLR) and its epoch / best-AUC progress."""
    from medpretrain.resume import COMPLETE_MARKER, TRAINING_STATE

    log = tmp_path / "loads.jsonl"
    env = {"MEDPRETRAIN_DATA": str(data_root)}
    if script == "pretrain/moco.py":
        run = tmp_path / "r"
        args = [*PRETRAIN, f"out_dir={tmp_path}", "run_name=r"]
        first = guarded(log, ROOT / script, args, ROOT, {**env, "MEDPRETRAIN_FAULT_EXIT_AT_STEP": "3"})
        resumed_args, resumed_says = [*args, "train.resume=auto"], "at step 2/4"
    else:
        run = tmp_path / "ft"
        args = [*FINETUNE, f"output_dir={run}"]
        first = guarded(log, ROOT / script, args, tmp_path, {**env, "MEDPRETRAIN_FAULT_EXIT_IN_CHECKPOINT": "2"})
        resumed_args, resumed_says = [*args, "resume=auto"], "after epoch 1"
    assert first.returncode == 137, first.stderr[-3000:]
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if (p / COMPLETE_MARKER).exists())
    assert ckpts and all((p / TRAINING_STATE).is_file() and not list(p.glob("custom_checkpoint_*"))
                         for p in ckpts), [sorted(q.name for q in p.iterdir()) for p in ckpts]

    resumed = guarded(log, ROOT / script, resumed_args, ROOT if script.startswith("pretrain") else tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_says in resumed.stdout + resumed.stderr, resumed.stdout[-2000:]
    loads = guard_log(log)
    assert [e for e in loads if e["refused"]] == []
    read = {Path(e["file"]).name for e in loads if Path(e["file"]).parent == ckpts[0]}
    assert {"optimizer.bin", "random_states_0.pkl"} <= read, loads  # the guard saw accelerate's loads
    record("untrusted files", f"resume of {script} under a guard that refuses every unpickling load",
           f"resumed ({resumed_says}); {len(loads)} torch.load calls, all weights_only=True; pickle never called")
