"""A grid cell's folder before it runs (:func:`medpretrain.pipeline.grid._fresh`): an interrupted run of the same
cell is kept for ``resume=auto``; the partial run of another config is emptied, so its checkpoints are never
resumed under the new settings (a DRIVE cell re-planned from 1000 to 800 steps once resumed the old run's
checkpoint and trained on to step 1000)."""

from __future__ import annotations

import json
from pathlib import Path

from medpretrain.config import load_config
from medpretrain.finetune import output_dir, run_hash
from medpretrain.pipeline.grid import CELL_MARKER, CompareConfig, _fresh, cell_config, grid


def _cell(tmp_path: Path, steps: int) -> list[str]:
    cfg = load_config(CompareConfig, [f"runs_dir={tmp_path}", "inits=[scratch]", "label_fractions=[0.1]",
                                      "seeds=[0]", "regimes=[full]",
                                      f"overrides=[backbone.arch=cbr_tiny, optim.steps={steps}]"])
    (argv,) = grid(cfg)
    return argv


def _partial_run(folder: Path) -> None:
    (folder / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_0" / "marker").write_text("x")
    (folder / "run.log").write_text("epoch 1 ...\n")


def test_an_interrupted_run_of_the_same_cell_is_kept_for_resume(tmp_path: Path) -> None:
    argv = _cell(tmp_path, 800)
    out = _fresh(argv)
    assert out == output_dir(cell_config(argv))
    marker = json.loads((out / CELL_MARKER).read_text())
    assert marker == {"config_hash": run_hash(cell_config(argv))}
    _partial_run(out)
    assert _fresh(argv) == out
    assert (out / "checkpoints" / "checkpoint_0" / "marker").read_text() == "x"  # resume=auto continues it


def test_the_partial_run_of_another_config_is_emptied_not_resumed(tmp_path: Path) -> None:
    old, new = _cell(tmp_path, 1000), _cell(tmp_path, 800)
    out = _fresh(old)
    assert output_dir(cell_config(new)) == out  # same folder, other budget: the case that went wrong
    assert run_hash(cell_config(old)) != run_hash(cell_config(new))
    _partial_run(out)
    assert _fresh(new) == out
    assert not (out / "checkpoints").exists() and not (out / "run.log").exists()
    assert json.loads((out / CELL_MARKER).read_text())["config_hash"] == run_hash(cell_config(new))


def test_a_folder_without_marker_or_with_results_is_emptied(tmp_path: Path) -> None:
    argv = _cell(tmp_path, 800)
    out = output_dir(cell_config(argv))
    _partial_run(out)  # an interrupted cell from before the marker existed: its config is unknown
    _fresh(argv)
    assert not (out / "checkpoints").exists()
    (out / "results.json").write_text("{}")  # results that pending() did not keep (another hash, unreadable)
    _fresh(argv)
    assert not (out / "results.json").exists() and (out / CELL_MARKER).is_file()


def test_grid_workers_end_when_the_grid_process_is_killed(tmp_path: Path) -> None:
    """A killed orchestrator leaves no grid worker running (they once went on training, orphaned, and wrote into
    the cell folders of the restarted experiment)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "grid_parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from medpretrain.pipeline.grid import _worker_init\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=_worker_init, initargs=(1,))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    assert alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the grid worker outlived its killed parent")


def test_resume_refuses_a_checkpoint_beyond_a_smaller_budget(tmp_path: Path) -> None:
    """``resume=auto`` may extend a run (a larger budget) but not shrink it: a checkpoint after period 4 of a
    4-period run, resumed with a 2-period budget, is refused with one line instead of reporting the old run's
    results under the new config."""
    import pytest
    from test_data_cache import png_folder

    from medpretrain.config import ConfigError
    from medpretrain.finetune import main_in_process
    from medpretrain.utils import PROJECT_ROOT

    folder = png_folder(tmp_path / "png", n=8)
    out = tmp_path / "run"
    args = ["--config", str(PROJECT_ROOT / "configs/finetune.yaml"), f"data.dataset=folder:{folder}",
            "data.image_size=16", "data.val_fraction=0.25", "data.test_fraction=0.25", "data.dedup=none",
            "backbone.arch=cbr_tiny", "optim.eval_every=1", "optim.batch_size=4", "optim.eval_batch_size=16",
            "n_bootstrap=10", "eval.reuse_images=0", "keep_checkpoints=true", f"output_dir={out}"]
    assert main_in_process([*args, "optim.steps=4"]) == 0
    assert json.loads((out / "results.json").read_text())["optimizer_steps"] == 4
    with pytest.raises(ConfigError, match=r"after period 4 of a longer run, but this config's budget has 2 "):
        main_in_process([*args, "optim.steps=2", "resume=auto"])
