"""benchmarks/bench_throughput.py: the parsing and aggregation behind its images/s and GPU numbers (no training)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
bt = importlib.util.module_from_spec(spec)
sys.modules["bench_throughput"] = bt
spec.loader.exec_module(bt)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_logged_rate_is_images_over_time_without_the_first_window(tmp_path):
    # SimCLR/MoCo metrics.csv: a kNN row (no rate) and 4 windows of 5 steps x 8 images = 40 images each,
    # at 10 (warm-up), 20, 20, 40 images/s -> 4, 2, 2, 1 s. Without the first: 120 images / 5 s = 24 (a mean
    # of the rates would say 26.7).
    csv = write(tmp_path / "metrics.csv", "step,epoch,loss,lr,images_per_s,knn_acc,time_s\n"
                "0,0,,,,0.74,\n5,0,6.1,0.06,10,,4\n10,0,6.0,0.06,20,,6\n15,0,5.9,0.05,20,,8\n"
                "20,0,5.8,0.04,40,,9\n20,1,,,,0.80,\n")
    r = bt.logged_rate(bt.read_csv(csv), images_per_step=8)
    assert r["images_per_s"] == pytest.approx(24.0)
    assert (r["images"], r["seconds"], r["windows"]) == (120, pytest.approx(5.0), 4)
    assert r["warmup_excluded"] and r["first_window_images_per_s"] == pytest.approx(10.0)


def test_logged_rate_uneven_last_window_and_single_window(tmp_path):
    # 12 steps logged every 5: windows of 5, 5, 2 steps x 4 images -> 20, 20, 8 images at 5, 10, 8 img/s.
    rows = [{"step": "5", "images_per_s": "5"}, {"step": "10", "images_per_s": "10"}, {"step": "12", "images_per_s": "8"}]
    assert bt.logged_rate(rows, 4)["images_per_s"] == pytest.approx(28 / (2 + 1))
    one = bt.logged_rate(rows[:1], 4)
    assert one["images_per_s"] == pytest.approx(5.0) and not one["warmup_excluded"]
    with pytest.raises(ValueError, match="no timed windows"):
        bt.logged_rate([{"step": "0", "images_per_s": ""}], 4)


def test_elapsed_rate_uses_training_rows_only(tmp_path):
    # VAE metrics.csv: cumulative elapsed_s; the validation row (no loss) at the end is not a training window.
    csv = write(tmp_path / "metrics.csv", "step,epoch,loss,recon,kl,beta,perceptual,val_mse,val_psnr,elapsed_s\n"
                "5,0,120,118,36,0.1,,,,3.0\n10,0,83,74,84,0.2,,,,4.0\n15,0,80,70,80,0.3,,,,6.0\n"
                "15,0,,,,,,0.03,14.9,20.0\n")
    r = bt.elapsed_rate(bt.read_csv(csv), images_per_step=16)
    assert r["images_per_s"] == pytest.approx(160 / 3.0)
    assert r["first_window_images_per_s"] == pytest.approx(80 / 3.0)


def test_finetune_rates_difference_out_the_validation_pass(tmp_path):
    # One step 0.5 s, the rest of an epoch 3 s; epoch 1 is slower (warm-up) and must not count.
    long = write(tmp_path / "long.csv", "epoch,train_loss,val_auc,val_accuracy,lr,epoch_s\n"
                 "1,0.7,0.5,0.7,0.001,30\n2,0.5,0.6,0.7,0.001,9.0\n3,0.4,0.7,0.8,0.0001,9.0\n")
    short = write(tmp_path / "short.csv", "epoch,train_loss,val_auc,val_accuracy,lr,epoch_s\n"
                  "1,0.7,0.5,0.7,0.001,20\n2,0.6,0.6,0.7,0.001,5.0\n3,0.6,0.6,0.7,0.0001,5.0\n")
    r = bt.finetune_rates(bt.read_csv(long), 12, 32, bt.read_csv(short), 4)
    assert r["step_s"] == pytest.approx(0.5) and r["other_epoch_s"] == pytest.approx(3.0)
    assert r["step_images_per_s"] == pytest.approx(64.0)
    assert r["epoch_images_per_s"] == pytest.approx(12 * 32 / 9.0)
    assert r["epoch_s"] == [9.0, 9.0]
    # Load noise that makes the long epochs no slower than the short ones gives no step rate, not a negative one.
    noisy = bt.finetune_rates(bt.read_csv(short), 12, 32, bt.read_csv(long), 4)
    assert noisy["step_images_per_s"] is None
    with pytest.raises(ValueError, match=">= 2 epochs"):
        bt.finetune_rates([{"epoch": "1", "epoch_s": "3"}], 12, 32)


def test_finetune_steps_per_epoch():
    assert bt.finetune_steps(3882, 128, 1, 0) == 30
    assert bt.finetune_steps(3882, 128, 4, 0) == 7
    assert bt.finetune_steps(3882, 16, 1, 8) == 8
    assert bt.finetune_steps(3882, 128, 1, 500) == 30


CANNED_SMI = """0, 87, 10240
1, 12, 2048
0, [N/A], 10300
garbage line
1, 95, 3000

"""


def test_parse_smi_lines():
    parsed = [bt.parse_smi_line(line) for line in CANNED_SMI.splitlines()]
    assert parsed == [(0, 87.0, 10240.0), (1, 12.0, 2048.0), (0, None, 10300.0), None, (1, 95.0, 3000.0), None]
    # The brief's query without the index field: GPU 0.
    assert bt.parse_smi_line("42, 1234\n") == (0, 42.0, 1234.0)
    assert bt.parse_smi_line("[Not Supported], 1234") == (0, None, 1234.0)
    assert bt.parse_smi_line("utilization.gpu [%], memory.used [MiB]") is None  # a header carries no sample
    assert bt.parse_smi_line("0, [N/A], [N/A]") is None


def test_gpu_summary_window_and_gpus():
    samples = [(float(t), i, u, m) for t, i, u, m in [
        (0, 0, 0.0, 500.0), (1, 0, 80.0, 9000.0), (2, 0, None, 9500.0), (3, 0, 100.0, 9400.0),
        (4, 0, 10.0, 600.0), (1, 1, 50.0, 20000.0)]]
    s = bt.gpu_summary(samples, start=0.5, end=3.5, gpus={0})
    assert (s["util_mean"], s["util_max"], s["mem_peak_mib"], s["samples"], s["window"]) == (90.0, 100.0, 9500.0, 3, "training")
    whole = bt.gpu_summary(samples, gpus={0})
    assert whole["util_mean"] == pytest.approx(190 / 4) and whole["window"] == "whole run"
    assert bt.gpu_summary(samples, start=10, end=11)["window"] == "whole run"  # empty window: all samples
    assert bt.gpu_summary(samples)["mem_peak_mib"] == 20000.0
    assert bt.gpu_summary([])["util_mean"] is None


def test_launcher_processes(tmp_path):
    (tmp_path / "multi.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    assert bt.launcher_processes([]) == 1
    assert bt.launcher_processes(["--config_file", "multi.yaml"], root=tmp_path) == 4
    assert bt.launcher_processes(["--config_file=multi.yaml", "--num_processes", "2"], root=tmp_path) == 2
    assert bt.launcher_processes(["--num_processes=8"]) == 8


def test_config_overrides_and_commands():
    cfg = bt.load_config(bt.ThroughputConfig, ["steps=3", "launch_args=[--config_file, configs/accelerate/multi_gpu.yaml]",
                                               "mixed_precision=bf16", "stages=[simclr, finetune]"])
    assert cfg.launch_args == ["--config_file", "configs/accelerate/multi_gpu.yaml"] and cfg.stages == ["simclr", "finetune"]
    prefix = bt.launch_prefix(cfg, cuda=True, cores=2)
    assert prefix[-2:] == ["--mixed_precision", "bf16"] and "--cpu" not in prefix
    cmd = bt.stage_command("simclr", cfg, bt.ROOT / "runs" / "x" / "simclr" / "bench", prefix)
    assert "train.max_steps=3" in cmd and "train.mixed_precision=bf16" in cmd and "out_dir=runs/x/simclr" in cmd
    ft = bt.stage_command("finetune", cfg, bt.ROOT / "runs" / "x" / "ft", prefix, steps_per_epoch=5)
    assert "optim.max_steps_per_epoch=5" in ft and "finetune/run.py" in ft
    cpu = bt.launch_prefix(bt.load_config(bt.ThroughputConfig, []), cuda=False, cores=2)
    assert "--cpu" in cpu and cpu[-1] == "no"
    assert not any(a.startswith("train.mixed_precision") for a in bt.stage_command(
        "moco", bt.load_config(bt.ThroughputConfig, []), bt.ROOT / "r" / "m" / "b", cpu))
    with pytest.raises(ValueError, match="unknown stage"):
        bt.stage_command("ddpm", cfg, bt.ROOT / "r", prefix)


def test_run_stage_samples_a_fake_gpu_between_the_marker_lines(tmp_path, monkeypatch):
    # A stand-in nvidia-smi on PATH prints one sample per GPU every 50 ms (busy: 90 %, 4000 MiB on GPU 0) and
    # a stand-in "script" prints the training start and end lines 0.6 s apart, idling before and after.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in *-lms*) while true; do echo '0, 90, 4000'; echo '1, 5, 100'; sleep 0.05; done;;\n"
                    "*) echo '0, 0, 300'; echo '1, 0, 100';; esac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    code = ("import time; time.sleep(0.3); print('SimCLR: start 1 process(es) on cuda:0; run', flush=True); "
            "time.sleep(0.6); print('backbone: done', flush=True); time.sleep(0.3)")
    r = bt.run_stage(["-c", code], (r"^SimCLR: ", r"^backbone: "), tmp_path / "run.log", cuda=True, sample_ms=50,
                     timeout_s=60)
    assert r["device_line"] == "cuda:0" and r["gpu_before"] == [(0, 0.0, 300.0), (1, 0.0, 100.0)]
    assert 0.5 < r["window_s"] < 1.5 and r["wall_s"] >= r["window_s"]
    g = bt.gpu_fields(r, processes=1)  # GPU 0 only
    assert g["window"] == "training" and g["samples"] >= 3
    assert (g["util_mean"], g["util_max"], g["mem_peak_mib"], g["mem_before_mib"]) == (90.0, 90.0, 4000.0, 300.0)
    assert (tmp_path / "run.log").read_text().startswith("SimCLR: start")
    with pytest.raises(RuntimeError, match="exit status 3"):
        bt.run_stage(["-c", "import sys; sys.exit(3)"], ("a", "b"), tmp_path / "bad.log", cuda=False, sample_ms=50,
                     timeout_s=60)
