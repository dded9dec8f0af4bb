"""Errors a person can read: one line, ``error: <file or key>: <reason>``, exit status 2.

Unit tests of :func:`medpretrain.cli.run`, then real entry scripts through the launchers a user types:
``python -m medpretrain.launch`` (accelerate's launcher, the child's exit status), ``accelerate launch``
itself (what accelerate adds: a second traceback, or exit 1 under ``-q``) and ``torchrun`` (one line for
two ranks). The scripts fail before any heavy work, so each launch takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_reliability_inputs import write_png_bomb

from medpretrain.cli import UserError, run
from medpretrain.config import ConfigError
from medpretrain.data.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "configs" / "accelerate" / "single.yaml"
WORKER = "tests/cli_error_worker.py"
UNKNOWN_KEY = "error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"


# --------------------------------------------------------------------------------------------
# cli.run
# --------------------------------------------------------------------------------------------


def _raise(err: BaseException):
    def main(argv: list[str]) -> None:
        raise err

    return main


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    for name in ("MEDPRETRAIN_DEBUG", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("err, line", [
    (ConfigError("unknown config key 'train.epoch' (did you mean 'train.epochs'?)"), UNKNOWN_KEY),
    (DataError("/data/a/x.png", "corrupt or truncated\nimage"), "error: /data/a/x.png: corrupt or truncated image"),
    (FileNotFoundError(2, "No such file or directory", "runs/simclr/x.safetensors"),
     "error: runs/simclr/x.safetensors: No such file or directory"),
    (FileExistsError("runs/x: run folder exists; pass --resume auto"), "error: runs/x: run folder exists; pass --resume auto"),
    (UserError("init=imagenet: unavailable offline"), "error: init=imagenet: unavailable offline"),
])
def test_expected_error_is_one_line_on_stderr_and_exit_2(capsys, err, line):
    with pytest.raises(SystemExit) as e:
        run(_raise(err), [])
    assert e.value.code == 2
    out, errout = capsys.readouterr()
    assert (out, errout) == ("", line + "\n")


def test_return_value_is_the_exit_status_and_argv_is_passed(capsys):
    seen = []
    with pytest.raises(SystemExit) as e:
        run(lambda argv: seen.append(argv) or 3, ["a=1"])
    assert (e.value.code, seen) == (3, [["a=1"]])
    with pytest.raises(SystemExit) as e:
        run(lambda argv: {"not": "an int"}, [])
    assert e.value.code == 0
    assert capsys.readouterr() == ("", "")


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        run(_raise(RuntimeError("a bug")), [])
    with pytest.raises(ValueError, match="plain ValueError"):  # not every ValueError is the user's
        run(_raise(ValueError("plain ValueError")), [])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, shows", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_debug_env_shows_the_traceback(monkeypatch, capsys, value, shows):
    monkeypatch.setenv("MEDPRETRAIN_DEBUG", value)
    if shows:
        with pytest.raises(ConfigError, match="did you mean"):
            run(_raise(ConfigError("unknown config key 'train.epoch' (did you mean 'train.epochs'?)")), [])
        assert capsys.readouterr().err == ""
    else:
        with pytest.raises(SystemExit):
            run(_raise(ConfigError("unknown config key 'train.epoch' (did you mean 'train.epochs'?)")), [])
        assert capsys.readouterr().err == UNKNOWN_KEY + "\n"


def test_ranks_of_one_torch_elastic_run_print_each_message_once(monkeypatch, capsys, tmp_path):
    """Every rank exits 2 and writes its error file; the first rank prints a message, the others do not."""
    attempt = tmp_path / "run" / "attempt_0"
    printed = []
    for rank, message in ((0, "same"), (1, "same"), (2, "other")):
        (attempt / str(rank)).mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / str(rank) / "error.json"))
        with pytest.raises(SystemExit) as e:
            run(_raise(ConfigError(message)), [])
        assert e.value.code == 2
        printed.append(capsys.readouterr().err)
        data = json.loads((attempt / str(rank) / "error.json").read_text())
        assert data["message"]["message"] == data["message"]["extraInfo"]["py_callstack"] == f"error: {message}"
    assert printed == ["error: same\n", "", "error: other\n"]


# --------------------------------------------------------------------------------------------
# Real entry scripts through the launchers
# --------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDPRETRAIN_DEBUG", "TORCHELASTIC_ERROR_FILE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python -m medpretrain.launch --config_file configs/accelerate/single.yaml <args>`` from the repo root."""
    cmd = [sys.executable, "-m", "medpretrain.launch", "--config_file", str(SINGLE), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)


def _accelerate(args: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("accelerate")
    cmd = [str(exe), "launch", "--config_file", str(SINGLE), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _good_pngs(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    for i in range(4):
        (folder / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(folder / "a" / f"good{i}.png")


@pytest.mark.slow
def test_audit_script_through_the_launcher_unknown_key_corrupt_image_and_bomb(tmp_path):
    """scripts/audit_synthetic.py: the config is checked, then the real images are read, before any model."""
    data = tmp_path / "data"
    _good_pngs(data)
    common = ["scripts/audit_synthetic.py", f"fake={tmp_path / 'fake.npz'}", f"out={tmp_path / 'audit'}",
              f"data.dataset=folder:{data}", "data.image_size=12"]

    proc = _launch([*common, "memo.n_trian=5"])
    assert (proc.returncode, proc.stderr) == (2, "error: unknown config key 'memo.n_trian' (did you mean "
                                                 "'memo.n_train'?)\n")

    (data / "a" / "notes.png").write_text("a text file, not an image\n")
    proc = _launch(common)
    expected = f"error: {data / 'a' / 'notes.png'}: not a readable image (unknown format or not an image)\n"
    assert (proc.returncode, proc.stderr) == (2, expected)

    (data / "a" / "notes.png").unlink()
    write_png_bomb(data / "a" / "bomb.png")
    assert (data / "a" / "bomb.png").stat().st_size < 200_000
    proc = _launch(common)
    expected = (f"error: {data / 'a' / 'bomb.png'}: image has 900000000 pixels, above the limit of 268435456 "
                "(data.max_pixels)\n")
    assert (proc.returncode, proc.stderr) == (2, expected)


@pytest.mark.slow
def test_sample_script_missing_weights_file_through_the_launcher(tmp_path):
    missing = tmp_path / "runs" / "dcgan" / "generator.safetensors"
    proc = _launch(["generative/sample.py", f"--model={missing}", f"--out={tmp_path / 'samples'}"])
    assert (proc.returncode, proc.stderr) == (2, f"error: {missing}: model file not found\n")
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow
def test_what_accelerate_launch_itself_adds():
    """Plain ``accelerate launch``: the child's line first, then accelerate's own report ending in its
    CalledProcessError traceback, exit 1 (accelerate 1.16 added a ``RuntimeError`` repeating the child's last
    line; before it the traceback followed at once); with ``-q``: the child's line alone, exit 1.
    ``medpretrain.launch``: the line alone, exit 2."""
    plain = _accelerate([WORKER, "train.epoch=1"])
    lines = plain.stderr.splitlines()
    assert plain.returncode == 1 and lines[0] == UNKNOWN_KEY
    assert "Traceback (most recent call last):" in lines[1:]
    assert lines[-1].startswith("subprocess.CalledProcessError: Command '[") and "exit status 2" in lines[-1]

    quiet = _accelerate(["-q", WORKER, "train.epoch=1"])
    assert (quiet.returncode, quiet.stderr) == (1, UNKNOWN_KEY + "\n")

    ours = _launch([WORKER, "train.epoch=1"])
    assert (ours.returncode, ours.stdout, ours.stderr) == (2, "", UNKNOWN_KEY + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("fail, status, last", [
    ("crash", 1, f"error: {WORKER} exited with status 1"),
    ("kill", 137, f"error: {WORKER} was killed by SIGKILL"),
])
def test_launcher_reports_other_failures_in_one_added_line(fail, status, last):
    proc = _launch([WORKER, f"fail={fail}"])
    lines = proc.stderr.splitlines()
    assert (proc.returncode, lines[-1]) == (status, last)
    assert ("RuntimeError: a bug, not an expected error" in proc.stderr) == (fail == "crash")  # the child's own
    assert "CalledProcessError" not in proc.stderr


@pytest.mark.slow
def test_debug_env_through_the_launcher_shows_the_childs_traceback():
    proc = _launch([WORKER, "train.epoch=1"], MEDPRETRAIN_DEBUG="1")
    assert proc.returncode == 1  # accelerate's own behaviour, untouched
    assert "medpretrain.config.ConfigError: unknown config key 'train.epoch'" in proc.stderr
    assert "subprocess.CalledProcessError" in proc.stderr


@pytest.mark.slow
def test_two_ranks_print_one_line():
    """Both ranks hit the config error. ``medpretrain.launch --torchrun``: one line, exit 2. Plain ``torchrun``:
    one line from the ranks, then torch's ChildFailedError traceback and summary (showing the line), exit 1."""
    two = ["--standalone", "--nproc_per_node", "2", WORKER, "train.epoch=1"]
    ours = subprocess.run([sys.executable, "-m", "medpretrain.launch", "--torchrun", *two], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert (ours.returncode, ours.stderr) == (2, UNKNOWN_KEY + "\n")

    torchrun = Path(sys.executable).with_name("torchrun")
    plain = subprocess.run([str(torchrun), *two], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    lines = plain.stderr.splitlines()
    assert plain.returncode == 1 and lines.count(UNKNOWN_KEY) == 1, plain.stderr
    assert "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: " in lines
    assert f"  traceback : {UNKNOWN_KEY}" in lines  # the summary reads the rank's error file


# --------------------------------------------------------------------------------------------
# threads of a CPU launch
# --------------------------------------------------------------------------------------------


def test_cpu_launch_uses_every_cpu_unless_told(tmp_path, monkeypatch) -> None:
    """accelerate gives a single-process launch whose config does not say use_cpu one thread; on a CPU-only
    machine medpretrain.launch gives it the CPUs it may use (split between processes), and leaves an explicit
    OMP_NUM_THREADS / --num_cpu_threads_per_process or a GPU machine alone."""
    from argparse import Namespace

    from medpretrain.launch import cpu_threads

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = Namespace(num_cpu_threads_per_process=None, num_processes=None, config_file=str(SINGLE))
    assert cpu_threads(args, cuda=False) == cpus
    assert cpu_threads(args, cuda=True) is None
    assert cpu_threads(Namespace(num_cpu_threads_per_process=None, num_processes=2, config_file=None),
                       cuda=False) == max(1, cpus // 2)
    assert cpu_threads(Namespace(num_cpu_threads_per_process=3, num_processes=None, config_file=None),
                       cuda=False) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(args, cuda=False) is None

    script = tmp_path / "threads.py"
    script.write_text("import os, torch\nprint('threads', os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "medpretrain.launch", "--config_file", str(SINGLE), str(script)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"threads {cpus} {cpus}" in out.stdout
