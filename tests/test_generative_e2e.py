"""End to end: generative/vae.py and generative/dcgan.py through ``accelerate launch`` on real
PneumoniaMNIST (28 px, a few steps, the small ``cbr_tiny`` backbone), then their outputs: exported
backbones load for fine-tuning (``load_backbone`` and ``init_backbone('vae' | 'dcgan')``), samples have
the right shape and range, a killed run resumes to the same weights as an uninterrupted one, and NaN
losses and mode collapse stop the run with a clear message."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpretrain.checkpoint import load_backbone, load_backbone_state, load_state_dict
from medpretrain.config import DataConfig
from medpretrain.data import build_dataset
from medpretrain.init import init_backbone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = ["backbone.arch=cbr_tiny", "train.batch_size=16", "train.log_every=1", "train.grid_size=16",
        "train.log_with=none"]


def launch(script: str, args: list[str], data_root: Path, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script), *args]
    full_env = {**os.environ, "MEDPRETRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metric_steps(run: Path, key: str) -> list[int]:
    with open(run / "metrics.csv", newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r[key] != ""]


def test_vae_trains_exports_and_resumes_exactly(tmp_path, data_root):
    out = tmp_path / "runs" / "generative" / "vae"
    args = [*TINY, f"out_dir={out}", "train.max_steps=6", "train.checkpoint_every=2", "beta_warmup_steps=3"]

    # Killed right after step 5 (no cleanup, like SIGKILL): the step-4 checkpoint is the last complete one.
    killed = launch("generative/vae.py", [*args, "run_name=r"], data_root,
                    env={"MEDPRETRAIN_FAULT_EXIT_AT_STEP": "5"}, check=False)
    # (accelerate's launcher reports the child's 137 and exits with 1)
    assert killed.returncode != 0 and "exit status 137" in killed.stderr, killed.stderr[-2000:]
    run = out / "r"
    assert not (run / "backbone.safetensors").exists()
    assert metric_steps(run, "loss") == [1, 2, 3, 4, 5]
    resumed = launch("generative/vae.py", [*args, "run_name=r", "train.resume=auto"], data_root)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert metric_steps(run, "loss") == [1, 2, 3, 4, 5, 6]  # step 5 logged once: rows after the checkpoint dropped
    assert metric_steps(run, "val_mse") == [6]

    for name in ("backbone.safetensors", "decoder.safetensors", "config.yaml", "metrics.csv", "loss.png",
                 "samples_epoch001.png", "results.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6
    # Real numbers: PSNR is the MSE's on the [0, 1] scale; after 6 steps the reconstructions beat the
    # constant grey (0.5) image, which is what the untrained decoder's tanh(~0) gives (0.029 vs 0.033 here),
    # and the real reference of the sample statistics is the validation images' mean.
    assert results["val_psnr"] == pytest.approx(10 * math.log10(1 / results["val_mse"]), rel=1e-12)
    val = build_dataset(DataConfig(dataset="medmnist:pneumoniamnist", root=str(data_root)), "val", unlabeled=True)
    x01 = (torch.stack([val[i]["image"] for i in range(len(val))]) + 1) / 2
    grey_mse = float((x01 - 0.5).pow(2).mean())
    assert results["val_mse"] < grey_mse, (results["val_mse"], grey_mse)
    stats = results["sample_stats"]
    assert stats["real_mean"] == pytest.approx(float(x01.mean()), abs=0.02), stats

    # The exported encoder is a contract backbone that fine-tuning can load.
    backbone, meta = load_backbone(run / "backbone.safetensors", arch="cbr_tiny", in_channels=1)
    assert (meta.method, meta.image_size, meta.steps, meta.mean, meta.std) == ("vae", 28, 6, 0.5, 0.5)
    assert backbone.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, backbone.num_features)
    inited, info = init_backbone("vae", "cbr_tiny", 1, "auto", image_size=28, runs_dir=tmp_path / "runs")
    assert Path(info.source) == run / "backbone.safetensors" and info.name == "vae"
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(inited.state_dict()[k], v)

    # A run without interruption reaches the same weights (order, noise and optimizer state restored).
    launch("generative/vae.py", [*args, "run_name=straight"], data_root)
    straight, _ = load_state_dict(out / "straight" / "decoder.safetensors")
    resumed_dec, dec_meta = load_state_dict(run / "decoder.safetensors")
    assert dec_meta["kind"] == "vae_decoder" and dec_meta["method"] == "vae"
    assert resumed_dec.keys() == straight.keys()
    assert all(torch.equal(resumed_dec[k], v) for k, v in straight.items())  # bit-identical on the CPU
    enc_straight, _ = load_backbone_state(out / "straight" / "backbone.safetensors")
    enc_resumed, _ = load_backbone_state(run / "backbone.safetensors")
    assert enc_resumed.keys() == enc_straight.keys()
    assert all(torch.equal(enc_resumed[k], v) for k, v in enc_straight.items())
    # and the logged losses, as written (the step-5 row of the killed run was dropped and re-done)
    def logged(folder: Path) -> list[dict[str, str]]:
        with open(folder / "metrics.csv", newline="") as fh:
            return [{k: r[k] for k in ("step", "loss", "recon", "kl", "beta", "val_mse")} for r in csv.DictReader(fh)]

    assert logged(run) == logged(out / "straight")

    # Samples from the decoder: shape and range.
    proc = subprocess.run([sys.executable, str(ROOT / "generative" / "sample.py"), "--model", str(run), "--n", "12",
                           "--out", str(tmp_path / "samples")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "samples" / "samples.npz") as npz:
        assert npz["images"].shape == (12, 28, 28) and npz["images"].dtype == np.uint8
    assert len(list((tmp_path / "samples" / "png").glob("sample_*.png"))) == 12

    # A second run under the name of a finished one is refused before any work, in one line (the one
    # run-folder policy of medpretrain.stage).
    again = launch("generative/vae.py", [*args, "run_name=r"], data_root, check=False)
    assert again.returncode != 0
    assert f"error: {run}: already finished (backbone.safetensors exists); pick another run_name\n" in again.stderr


def test_dcgan_trains_and_exports_discriminator_backbone(tmp_path, data_root):
    out = tmp_path / "runs" / "generative" / "dcgan"
    launch("generative/dcgan.py", [*TINY, "discriminator=backbone", f"out_dir={out}", "run_name=g", "train.max_steps=4",
                                   "train.checkpoint_every=2", "loss=hinge", "spectral_norm=true",
                                   "collapse_check_every=2", "train.mixed_precision=bf16"], data_root)
    run = out / "g"
    for name in ("backbone.safetensors", "generator.safetensors", "config.yaml", "metrics.csv", "loss.png",
                 "samples_epoch001.png", "results.json"):
        assert (run / name).is_file(), name
    assert metric_steps(run, "d_loss") == [1, 2, 3, 4]
    backbone, meta = load_backbone(run / "backbone.safetensors", arch="cbr_tiny")
    assert meta.method == "dcgan" and meta.extra["role"] == "discriminator trunk" and meta.extra["spectral_norm"]
    _, info = init_backbone("dcgan", "cbr_tiny", 1, "auto", image_size=28, runs_dir=tmp_path / "runs")
    assert Path(info.source) == run / "backbone.safetensors"
    state, gmeta = load_state_dict(run / "generator.safetensors")
    assert gmeta["kind"] == "dcgan_generator" and gmeta["image_size"] == 28 and gmeta["latent_dim"] == 100

    from medpretrain.generative.sampling import build_generator, generate, latent_noise

    gen = build_generator(gmeta)
    gen.load_state_dict(state)
    x = generate(gen, latent_noise(8, 100, 0))
    assert x.shape == (8, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()


def test_dcgan_mode_collapse_stops_with_a_clear_message(tmp_path, data_root):
    # Threshold 1.0: any generated batch less varied than the real one counts; 2 checks in a row stop the run.
    proc = launch("generative/dcgan.py", [*TINY, f"out_dir={tmp_path}", "run_name=c", "train.max_steps=20",
                                          "collapse_check_every=1", "collapse_threshold=1.0", "collapse_patience=2"],
                  data_root, check=False)
    assert proc.returncode != 0
    assert "mode collapse at step 2" in proc.stdout + proc.stderr
    assert (tmp_path / "c" / "samples_collapsed.png").is_file()
    assert not (tmp_path / "c" / "backbone.safetensors").exists()


def test_vae_nan_loss_stops_with_a_clear_message(tmp_path, data_root):
    proc = launch("generative/vae.py", [*TINY, f"out_dir={tmp_path}", "run_name=n", "train.max_steps=6"],
                  data_root, env={"MEDPRETRAIN_FAULT_NAN_AT_STEP": "2"}, check=False)
    assert proc.returncode != 0
    assert "loss is not finite (NaN or inf) at step 2" in proc.stdout + proc.stderr
    assert not (tmp_path / "n" / "backbone.safetensors").exists()


def test_ddpm_trains_and_samples_reproducibly(tmp_path, data_root):
    launch("generative/ddpm.py", ["train.batch_size=16", "train.log_every=1", "train.grid_size=4", "train.log_with=none",
                                  f"out_dir={tmp_path}", "run_name=d", "train.max_steps=3", "train.checkpoint_every=2",
                                  "sample_steps=2", "base_channels=16"], data_root)
    run = tmp_path / "d"
    for name in ("unet.safetensors", "config.yaml", "metrics.csv", "loss.png", "samples_epoch001.png", "results.json"):
        assert (run / name).is_file(), name
    assert not (run / "backbone.safetensors").exists()  # the UNet is not a registered backbone
    outs = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, str(ROOT / "generative" / "sample.py"), "--model", str(run), "--n", "5",
                               "--out", str(tmp_path / name), "--png", "false"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / name / "samples.npz").read_bytes())
    assert outs[0] == outs[1]
    with np.load(tmp_path / "a" / "samples.npz") as npz:
        assert npz["images"].shape == (5, 28, 28) and npz["images"].dtype == np.uint8
