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
from medpretrain.training import resolve_run_dir

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
