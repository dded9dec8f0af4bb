"""The DDPM as a generator of the experiments: the moving average of its weights (against a hand-computed
one), an exact resume with the average checkpointed, the generator-only registry stage that an experiment
trains, samples and audits but never fine-tunes from, and the one-line refusal of ``inits: [ddpm]``.

One tiny experiment (DDPM with 8 base channels, 4 steps at 28 px, a checkpoint every step) is shared by the
end-to-end tests: its stage is the uninterrupted run that the resumed one is compared with, and its
checkpoints hold the raw weights of every step the average is recomputed from."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medpretrain.checkpoint import load_state_dict
from medpretrain.config import ConfigError, load_config
from medpretrain.generative.configs import DDPMConfig
from medpretrain.generative.ddpm import averaged, build_ema
from medpretrain.methods import registry
from medpretrain.pipeline.experiment import ExperimentConfig, run_experiment
from medpretrain.pipeline.stages import Stage, grid_config, stage_common
from medpretrain.resume import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.dataset=medmnist:pneumoniamnist", "backbone.arch=cbr_tiny", "backbone.stem=standard"]
DDPM_TINY = ["train.max_steps=4", "train.batch_size=16", "train.log_every=1", "train.checkpoint_every=1",
             "train.checkpoint_total_limit=5", "train.grid_size=4", "train.log_with=none", "sample_steps=2",
             "base_channels=8"]
OFF = {"simclr": {"enabled": False}, "moco": {"enabled": False}, "vae": {"enabled": False},
       "dcgan": {"enabled": False}}


def experiment(tmp: Path, **sections: Any) -> Any:
    values = {"name": "gen", "out_dir": str(tmp / "exp"), "common": COMMON, "launch": {"launcher": "python"},
              **OFF, "ddpm": {"enabled": True, "overrides": DDPM_TINY}, **sections}
    path = tmp / "gen.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(ExperimentConfig, ["--config", str(path)])


def ema_decay(t: int, decay: float, power: float) -> float:
    """The decay of the ``t``-th EMA update (1-based): the first copies, then ``min(decay, 1 - t ** -power)``."""
    return 0.0 if t == 1 else min(decay, 1.0 - t ** -power)


def test_ema_is_the_warmed_up_moving_average_of_the_weights() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = build_ema(net, decay=0.9, power=0.75)
    expected: list[torch.Tensor] = []
    for t in range(1, 26):  # the warm-up reaches the cap 0.9 at t = 22
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        ema.step(net.parameters())
        d = ema_decay(t, 0.9, 0.75)
        raw = [p.detach().clone() for p in net.parameters()]
        expected = raw if t == 1 else [d * e + (1 - d) * w for e, w in zip(expected, raw, strict=True)]
    assert ema.cur_decay_value == 0.9 and ema_decay(21, 0.9, 0.75) < 0.9
    avg = averaged(net, ema)
    assert avg is not net
    for a, e, w in zip(avg.parameters(), expected, net.parameters(), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
        assert (a - w).abs().min() > 1e-3  # the average is not the last weights (nor were those touched)
    assert build_ema(net, 0.0) is None and averaged(net, None) is net
    with pytest.raises(ValueError, match="decay"):
        build_ema(net, 1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        DDPMConfig(ema_decay=1.5)


def test_registry_holds_the_ddpm_as_a_generator_only_stage() -> None:
    from medpretrain import init

    info = registry.stage("ddpm")
    assert (info.exports_backbone, info.done_file, info.config) == (False, "unet.safetensors", "configs/ddpm.yaml")
    assert load_config(DDPMConfig, [], defaults_file=ROOT / info.config).ema_decay == 0.999  # the YAML fits
    assert "ddpm" in registry.all_stages() and "ddpm" not in registry.stages()
    assert registry.generators()["ddpm"] == "unet.safetensors" and registry.generative_models() == ("vae", "dcgan")
    assert "ddpm" not in init.PRETRAIN_METHODS and "ddpm" not in registry.selfsup_methods()
    assert registry.stage("vae").done_file == "backbone.safetensors"
    with pytest.raises(ValueError, match="needs products"):
        registry.StageInfo("x", "generative", "generative/ddpm.py", "", "runs/x", exports_backbone=False)
    # the experiment's common reaches each stage as far as its config has the group (the DDPM has no backbone)
    assert stage_common(info, [*COMMON, "resume=auto"]) == [COMMON[0], "resume=auto"]
    assert stage_common(registry.stage("vae"), COMMON) == COMMON


def test_ddpm_is_no_init_and_the_refusal_is_one_line(tmp_path: Path) -> None:
    grid = {"enabled": True, "inits": ["scratch", "ddpm"], "grid": ["label_fractions=[0.05]", "seeds=[0]"]}
    with pytest.raises(ConfigError) as e:
        run_experiment(experiment(tmp_path, classification=grid))
    assert str(e.value) == ("classification.inits has 'ddpm', but stage ddpm exports no backbone to transfer (it "
                            "only generates images: list it under audit.generators)")
    assert not (tmp_path / "exp" / "gen" / "ddpm").exists()  # refused before any stage ran
    with pytest.raises(ConfigError, match=r"^audit.features has 'ddpm', but stage ddpm exports no backbone"):
        run_experiment(experiment(tmp_path, audit={"features": "ddpm"}))
    with pytest.raises(ConfigError, match=r"^variants\[v\].inits has 'ddpm', but stage ddpm exports no backbone"):
        run_experiment(experiment(tmp_path, audit={"enabled": False},
                                  variants=[{"name": "v", "stages": ["ddpm"], "inits": ["ddpm"]}]))
    # a grid with no inits listed runs every enabled stage with a backbone: the DDPM is not one of them
    cfg = experiment(tmp_path, classification={"enabled": True})
    exports = {"ddpm": [Stage("ddpm", "h", str(tmp_path / "unet.safetensors"))]}
    assert grid_config(cfg, tmp_path, "classification", exports).inits == ["scratch", "imagenet"]


@pytest.fixture(scope="module")
def ddpm_experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The tiny DDPM stage, 64 samples of it and their audit (features: a scratch cbr_tiny), run once."""
    tmp = tmp_path_factory.mktemp("ddpm")
    audit = {"generators": ["ddpm"], "features": "scratch", "n_samples": 64,
             "overrides": ["arch=cbr_tiny", "stem=standard", "n_real=64", "n_fake=64", "disc.epochs=1",
                           "disc.folds=2", "kid_subsets=2", "kid_subset_size=32", "memo.n_heldout=64",
                           "memo.n_train=256"]}
    cfg = experiment(tmp, audit=audit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the stages' threads (the resume test matches them bit for bit)
        run_experiment(cfg)
    return cfg, tmp / "exp" / "gen"


def stages_of(exp_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in (exp_dir / "stages").glob("*.json")}


def test_experiment_trains_samples_and_audits_the_ddpm(ddpm_experiment: tuple[Any, Path]) -> None:
    cfg, exp_dir = ddpm_experiment
    st = stages_of(exp_dir)
    assert [st[k]["status"] for k in ("ddpm", "samples_ddpm", "audit_ddpm")] == ["run", "run", "run"]
    unet = Path(st["ddpm"]["output"])
    assert unet.name == "unet.safetensors" and not unet.with_name("backbone.safetensors").exists()
    _, meta = load_state_dict(unet)
    assert (meta["kind"], meta["method"], meta["steps"], meta["ema_decay"]) == ("ddpm_unet", "ddpm", 4, 0.999)
    assert meta["config"]["base_channels"] == 8 and "backbone" not in meta["config"]
    assert json.loads(unet.with_name("results.json").read_text())["ema_decay"] == 0.999
    assert unet.with_name("samples_epoch001.png").is_file()
    with np.load(st["samples_ddpm"]["output"]) as npz:
        images = npz["images"]
    assert images.shape == (64, 28, 28) and images.dtype == np.uint8 and images.std() > 0
    samples = json.loads(Path(st["samples_ddpm"]["output"]).with_name("samples.json").read_text())
    assert Path(samples["model"]) == unet and samples["generator"]["ema_decay"] == 0.999
    audit = json.loads(Path(st["audit_ddpm"]["output"]).with_name("audit.json").read_text())
    assert audit["fake"]["n_used"] == 64 and len(audit["discriminator"]["fold_auc"]) == 2
    assert "| ddpm | " in (exp_dir / "report.md").read_text()
    # the done file of a generator-only stage is its generator: a second run reuses all three stages
    run_experiment(cfg)
    assert {s["status"] for s in stages_of(exp_dir).values()} == {"reused"}


def test_exported_unet_is_the_moving_average_and_a_resume_is_exact(ddpm_experiment: tuple[Any, Path],
                                                                    tmp_path: Path) -> None:
    _, exp_dir = ddpm_experiment
    run = Path(stages_of(exp_dir)["ddpm"]["output"]).parent
    exported, _ = load_state_dict(run / "unet.safetensors")
    ckpts = list_checkpoints(run / "checkpoints")
    assert len(ckpts) == 4  # one per step: the raw weights of steps 1..4
    raw = [load_file(c / "model.safetensors") for c in ckpts]  # accelerate's save_state
    assert exported.keys() == raw[-1].keys()
    expected = raw[0]
    for t, w in enumerate(raw[1:], start=2):
        d = ema_decay(t, 0.999, 0.75)  # 0.405, 0.561, 0.646
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    for k, v in exported.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
    moved = [k for k, v in exported.items() if not torch.allclose(v, raw[-1][k], rtol=0, atol=1e-7)]
    assert len(moved) > len(exported) // 2, moved  # the export is not the last raw weights

    # The run as if killed after step 3: the checkpoints of steps 3 and 4 and every output gone, so it resumes
    # from step 2 with the average restored from the checkpoint, and ends bit-identical to the uninterrupted run.
    # (In this process, to spare a start-up of torch and diffusers; one thread, as the stage had.)
    copy = tmp_path / "ddpm" / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(ckpts[2].name, ckpts[3].name, "unet.safetensors",
                                                             "results.json", "samples_*"))
    spec = importlib.util.spec_from_file_location("ddpm_script_resume", ROOT / "generative" / "ddpm.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = script.main(["--config", str(ROOT / "configs" / "ddpm.yaml"), COMMON[0], *DDPM_TINY,
                               f"out_dir={copy.parent}", f"run_name={run.name}", "train.resume=auto"])
    finally:
        torch.set_num_threads(threads)
    assert results["steps"] == 4 and results["ema_decay"] == 0.999
    assert [int(r.split(",")[0]) for r in (copy / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]
    resumed, _ = load_state_dict(copy / "unet.safetensors")
    assert resumed.keys() == exported.keys()
    assert all(torch.equal(resumed[k], v) for k, v in exported.items())
    ema_state, _ = load_state_dict(list_checkpoints(copy / "checkpoints")[-1] / "training_state.safetensors")
    assert any(k.startswith("ema.shadow_params.") for k in ema_state)
