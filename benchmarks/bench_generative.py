"""The generative benchmark (issue 17), read from the generator experiments.

    python benchmarks/bench_generative.py                  # read the finished experiments, write the results
    python benchmarks/bench_generative.py run=true         # run (or resume) the experiments first
    python benchmarks/bench_generative.py "experiments=[configs/experiments/generative_pneumonia.yaml]"

Each experiment (``configs/experiments/generative_pneumonia.yaml``, ``generative_busi.yaml``) trains a
class-conditional VAE, DCGAN and DDPM, draws and audits their samples in an in-domain feature space and
fine-tunes ``scratch`` with and without their samples (``scratch@syn<generator>``). This script trains nothing
unless ``run=true``; it reads the experiment folder (``stages/*.json``, the generators' ``results.json``, the
audits' ``audit.json``, ``experiment.json``) and writes ``benchmarks/results/<name>.{json,md}``:

* per generator: training wall-clock (the experiment's stage record) and optimizer steps, the VAE's
  validation reconstruction PSNR / SSIM, sample statistics of the audited samples against the real
  validation images (pixel mean / std, diversity ratio overall and within each class, intensity-histogram L1);
* the audit (FID and KID against the real-vs-real baseline, precision / recall / density / coverage,
  memorised samples, the fixed-budget discriminator score, the cross-fitted AUC) in the audit's ranking order;
* the issue's targets for the best generator (:data:`TARGETS`, on ``targets_for``), each met or not met;
* "scratch + synthetic - scratch" at every label budget with the experiment report's CIs;
* per-class sample grids (a real row above two generated rows per class) as small PNGs under ``grids_dir``,
  and what they show by eye from ``observations`` (a YAML file written by a person who looked at them).

An experiment that has not finished is reported as far as its stage records go (and says so).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medpretrain.config import DataConfig, load_config
from medpretrain.generative.monitor import sample_statistics
from medpretrain.utils import PROJECT_ROOT, atomic_write_text, code_version

GENERATORS = ("vae", "dcgan", "ddpm")
MODEL_FILES = {"vae": "decoder.safetensors", "dcgan": "generator.safetensors", "ddpm": "unet.safetensors"}


@dataclass
class BenchConfig:
    experiments: list[str] = field(default_factory=lambda: ["configs/experiments/generative_pneumonia.yaml",
                                                            "configs/experiments/generative_busi.yaml"])
    """Experiment files; each is read from its folder ``<out_dir>/<name>/``."""
    run: bool = False
    """Run (or resume; finished stages are reused) each experiment with scripts/run_experiment.py first."""
    targets_for: str = "generative_pneumonia"
    """The experiment whose best generator the issue's targets apply to."""
    fid_ratio_max: float = 5.0
    """Target: FID at most this multiple of the real-vs-real baseline."""
    recall_min: float = 0.5
    coverage_min: float = 0.5
    memorised_max: int = 0
    grids_dir: str = "docs/generative"
    """Per-class grids ``<dataset>_<generator>.png`` (``<dataset>``: the experiment name without ``generative_``)."""
    grid_columns: int = 6  # 3 BUSI classes of 64 px in 10 columns were over grid_max_kb
    grid_fake_rows: int = 2
    """Rows of generated images under the real row, per class."""
    grid_max_kb: int = 200
    observations: str = "docs/generative/observations.yaml"
    """``{<experiment name>: {<generator>: "what the grid shows"}}``, written by a person after looking."""
    out_dir: str = "benchmarks/results"
    name: str = "generative"


# ------------------------------------------------------------------------------------------------
# Reading an experiment folder
# ------------------------------------------------------------------------------------------------

def timed_alone(experiment: str, stage: str, stage_hash: str | None) -> dict[str, Any] | None:
    """``benchmarks/bench_stage.py``'s record of this stage timed on its own, if there is one for the same stage
    hash (a record of another config of the stage is not this stage's time)."""
    rec = read_json(PROJECT_ROOT / "benchmarks" / "results" / f"stage_{experiment}_{stage}.json")
    return rec if rec is not None and stage_hash is not None and rec.get("hash") == stage_hash else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def experiment_dir(config: Path) -> tuple[str, Path, dict[str, Any]]:
    """The experiment's name, folder and YAML."""
    exp = yaml.safe_load(config.read_text()) or {}
    name = str(exp.get("name", config.stem))
    return name, (PROJECT_ROOT / str(exp.get("out_dir", "runs/experiments")) / name).resolve(), exp


def stage_records(exp_dir: Path) -> dict[str, dict[str, Any]]:
    """``stages/<name>.json`` of the experiment, by stage name."""
    out = {}
    for path in sorted((exp_dir / "stages").glob("*.json")):
        rec = read_json(path)
        if rec is not None:
            out[rec["name"]] = rec
    return out


def config_commit(config: Path) -> str:
    """The last commit that changed ``config`` (``-`` outside git or when uncommitted)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(config)], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return out or "-"


def load_images(npz: Path) -> tuple[torch.Tensor, np.ndarray | None, list[str]]:
    """``samples.npz`` -> images ``[N, C, H, W]`` in [0, 1], labels (or ``None``), class names."""
    with np.load(npz) as f:
        images = torch.from_numpy(f["images"].astype(np.float32) / 255.0)
        labels = f["labels"].astype(np.int64) if "labels" in f.files else None
        names = [str(n) for n in f["class_names"]] if "class_names" in f.files else []
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images, labels, names


def real_split(data: dict[str, Any], split: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """The images of ``split`` in [0, 1] (``[N, C, H, W]``) and their single labels, with the data options
    the generator trained with (its run's ``config.yaml``)."""
    from medpretrain.data import build_dataset

    keys = set(DataConfig.__dataclass_fields__)
    cfg = DataConfig(**{k: v for k, v in data.items() if k in keys})
    ds = build_dataset(cfg, split, unlabeled=True, normalize=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    source = ds.source
    labels = None
    if source.task in ("binary", "multiclass") and source.labels is not None:
        labels = np.asarray(source.labels)[ds.indices].astype(np.int64).reshape(-1)
    return images, labels


def histogram_l1(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> float:
    """L1 distance between normalised intensity histograms of two image sets in [0, 1] (0 same, 2 disjoint)."""
    ha = torch.histc(a.float().flatten(), bins=bins, min=0, max=1)
    hb = torch.histc(b.float().flatten(), bins=bins, min=0, max=1)
    return float((ha / ha.sum() - hb / hb.sum()).abs().sum())


def sample_summary(fake: torch.Tensor, fake_labels: np.ndarray | None, real: torch.Tensor,
                   real_labels: np.ndarray | None, class_names: list[str]) -> dict[str, Any]:
    """Pixel statistics, diversity ratio (overall and per class: a class-conditional generator can collapse
    within a class while the mixed batch still looks varied) and histogram L1 of ``fake`` against ``real``
    (both in [0, 1])."""
    out = sample_statistics(fake * 2 - 1, real * 2 - 1)
    out["histogram_l1"] = histogram_l1(fake, real)
    out["n_fake"], out["n_real"] = len(fake), len(real)
    if fake_labels is not None and real_labels is not None:
        per = {}
        for c, name in enumerate(class_names):
            f, r = fake[torch.from_numpy(fake_labels == c)], real[torch.from_numpy(real_labels == c)]
            if len(f) > 1 and len(r) > 1:
                s = sample_statistics(f * 2 - 1, r * 2 - 1)
                per[name] = {"diversity_ratio": s["diversity_ratio"], "mean": s["mean"], "real_mean": s["real_mean"],
                             "n_fake": len(f), "n_real": len(r)}
        out["per_class"] = per
    return out


def class_rows(real: torch.Tensor, real_labels: np.ndarray | None, fake: torch.Tensor,
               fake_labels: np.ndarray | None, class_names: list[str], columns: int, fake_rows: int) -> torch.Tensor:
    """Per class one row of real images (the first of the class) above ``fake_rows`` rows of generated ones
    (the first of the class), ``[rows * columns, C, H, W]``; unlabelled: one real row and the fake rows."""
    def first(x: torch.Tensor, labels: np.ndarray | None, c: int | None, n: int) -> torch.Tensor:
        sel = x if c is None or labels is None else x[torch.from_numpy(labels == c)]
        sel = sel[:n]
        if len(sel) < n:  # pad with blank tiles
            sel = torch.cat([sel, torch.ones(n - len(sel), *x.shape[1:])])
        return sel
    classes: list[int | None] = list(range(len(class_names))) if fake_labels is not None else [None]
    rows = []
    for c in classes:
        rows += [first(real, real_labels, c, columns), first(fake, fake_labels, c, columns * fake_rows)]
    return torch.cat(rows)


def save_class_grid(tiles: torch.Tensor, path: Path, columns: int, scale: int, max_kb: int) -> int:
    """Write ``tiles`` (``[N, C, H, W]`` in [0, 1]) as a PNG grid, each tile upscaled ``scale`` x (nearest), with
    a 2 px white border; returns the file size in bytes. Raises ``ValueError`` if it exceeds ``max_kb``."""
    from PIL import Image

    n, c, h, w = tiles.shape
    rows = math.ceil(n / columns)
    pad = 2
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, c), 255, np.uint8)
    arr = (tiles.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, k = divmod(i, columns)
        tile = arr[i].repeat(scale, 0).repeat(scale, 1)
        y, x = pad + r * (h * scale + pad), pad + k * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.save(path, optimize=True)
    size = path.stat().st_size
    if size > max_kb * 1024:
        raise ValueError(f"{path}: {size / 1024:.0f} KB, over grid_max_kb={max_kb}")
    return size


def audit_summary(a: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one ``audit.json`` the benchmark reports."""
    fk, rb = a["distribution"]["fake"], a["distribution"]["real_baseline"]
    probe = a.get("probe") or {}
    per_class = {}
    for name, e in (a.get("per_class") or {}).items():
        if "fake" in e:
            per_class[name] = {"n_per_side": e["n_per_side"],
                               **{k: e["fake"][k] for k in ("fid", "precision", "recall", "density", "coverage")},
                               "fid_baseline": e["real_baseline"]["fid"]}
    return {
        "n_fake": a["fake"]["n_used"], "n_per_side": a["distribution"]["n_per_side"],
        "feature_space": f"{a['backbone']['init']} {a['backbone']['arch']}",
        "auc": a["discriminator"]["auc"], "auc_ci95": a["discriminator"]["auc_ci95"],
        "probe_loss": (probe.get("fake") or {}).get("loss"), "probe_loss_sd": (probe.get("fake") or {}).get("loss_sd"),
        "probe_baseline": (probe.get("real_baseline") or {}).get("loss"),
        **{k: fk[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")},
        "baseline": {k: rb[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")},
        "fid_ratio": fk["fid"] / rb["fid"] if rb["fid"] > 0 else math.inf,
        "memorised": a["memorisation"]["n_flagged"], "per_class": per_class, "wall_s": a.get("wall_s"),
        "real_per_class": {name: e["n_real"] for name, e in (a.get("per_class") or {}).items() if "n_real" in e},
        "fake_per_class": {name: e["n_fake"] for name, e in (a.get("per_class") or {}).items() if "n_fake" in e},
    }


def targets(audit: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The issue's targets on one generator's audit, each with its value and ``met``."""
    return [
        {"target": f"FID <= {cfg.fid_ratio_max:g} x real-vs-real baseline", "value": audit["fid_ratio"],
         "shown": f"{audit['fid']:.2f} = {audit['fid_ratio']:.1f} x {audit['baseline']['fid']:.2f}",
         "met": audit["fid_ratio"] <= cfg.fid_ratio_max},
        {"target": f"recall >= {cfg.recall_min:g}", "value": audit["recall"], "shown": f"{audit['recall']:.3f}",
         "met": audit["recall"] >= cfg.recall_min},
        {"target": f"coverage >= {cfg.coverage_min:g}", "value": audit["coverage"],
         "shown": f"{audit['coverage']:.3f}", "met": audit["coverage"] >= cfg.coverage_min},
        {"target": f"memorised <= {cfg.memorised_max}", "value": audit["memorised"],
         "shown": f"{audit['memorised']} / {audit['n_fake']}", "met": audit["memorised"] <= cfg.memorised_max},
    ]


def synthetic_rows(exp_dir: Path, exp: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The experiment report's "scratch + synthetic - scratch" rows (``experiment.json["synthetic"]``; recomputed
    from the cells for an ``experiment.json`` written before the key existed)."""
    if exp is None:
        return []
    if "synthetic" in exp:
        return list(exp["synthetic"])
    from medpretrain.config import load_config as load
    from medpretrain.pipeline.experiment import ExperimentConfig, experiment_cells
    from medpretrain.pipeline.report import synthetic_comparisons

    _, cells = experiment_cells(exp_dir)
    return synthetic_comparisons(load(ExperimentConfig, ["--config", str(exp_dir / "experiment.yaml")]), cells)


def finished(exp: dict[str, Any], stages: dict[str, dict[str, Any]]) -> bool:
    """Whether ``experiment.json`` was written after every stage on record (each is in it with the same hash),
    i.e. by the invocation that ran them, and none of them failed. The per-class sample files of
    ``data.synthetic=stage:<generator>`` (``samples_<generator>_per_class``) are drawn inside the grid stage that
    uses them and are not listed in ``experiment.json``: that grid stage's own record stands for them."""
    written = {s["name"]: s.get("hash") for s in exp.get("stages", [])}
    return all(written.get(k) == v.get("hash") and v.get("status") != "failed" for k, v in stages.items()
               if not k.endswith("_per_class"))


def read_experiment(config: Path, cfg: BenchConfig, observations: dict[str, Any]) -> dict[str, Any]:
    """Everything the benchmark reports about one experiment folder."""
    name, exp_dir, exp_yaml = experiment_dir(config)
    stages = stage_records(exp_dir)
    exp = read_json(exp_dir / "experiment.json")
    if exp is not None and not finished(exp, stages):
        exp = None  # an earlier invocation's report: this one has not reached its end
    out: dict[str, Any] = {"name": name, "config": str(config.relative_to(PROJECT_ROOT)) if config.is_relative_to(
        PROJECT_ROOT) else str(config), "config_commit": config_commit(config), "exp_dir": str(exp_dir),
        "finished": exp is not None, "title": exp_yaml.get("title", name),
        "common": exp_yaml.get("common", []), "code_version": (exp or {}).get("machine", {}).get("code_version"),
        "machine": (exp or {}).get("machine"), "stages": {k: {f: v[f] for f in ("status", "wall_s", "hash")}
                                                          for k, v in stages.items()},
        "generators": {}}
    audits: dict[str, dict[str, Any]] = {}
    short = name.removeprefix("generative_")
    for g in GENERATORS:
        rec = stages.get(g)
        if rec is None:
            continue
        run_dir = Path(rec["output"]).parent
        res = read_json(run_dir / "results.json") or {}
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        entry: dict[str, Any] = {"status": rec["status"], "wall_s": rec["wall_s"], "steps": res.get("steps"),
                                 "epochs": res.get("epochs"), "train_wall_s": res.get("train_wall_s"),
                                 "overrides": (exp_yaml.get(g) or {}).get("overrides", []),
                                 "run_dir": str(run_dir), "alone": timed_alone(name, g, rec.get("hash"))}
        if g == "vae":
            entry["reconstruction"] = {k: res.get(k) for k in ("val_mse", "val_psnr", "val_ssim")}
        srec = stages.get(f"samples_{g}")
        if srec is not None and Path(srec["output"]).is_file():
            fake, fake_labels, names = load_images(Path(srec["output"]))
            val, val_labels = real_split(run_cfg.get("data") or {}, "val")
            entry["samples"] = sample_summary(fake, fake_labels, val, val_labels, names)
            train, train_labels = real_split(run_cfg.get("data") or {}, "train")
            tiles = class_rows(train, train_labels, fake, fake_labels, names, cfg.grid_columns, cfg.grid_fake_rows)
            grid = PROJECT_ROOT / cfg.grids_dir / f"{short}_{g}.png"
            scale = 2 if fake.shape[-1] <= 32 else 1
            entry["grid"] = {"path": str(grid.relative_to(PROJECT_ROOT)), "classes": names or ["(unlabelled)"],
                             "bytes": save_class_grid(tiles, grid, cfg.grid_columns, scale, cfg.grid_max_kb)}
        arec = stages.get(f"audit_{g}")
        a = read_json(Path(arec["output"]).with_name("audit.json")) if arec is not None else None
        if a is not None:
            audits[g] = a
            entry["audit"] = audit_summary(a)
        obs = (observations.get(name) or {}).get(g)
        if obs:
            entry["observation"] = str(obs).strip()
        out["generators"][g] = entry
    if audits:
        from medpretrain.audit import RANKING_RULE, rank_audits

        out["ranking"], out["ranking_rule"] = rank_audits(audits), RANKING_RULE
        best = out["ranking"][0]
        out["best"] = best
        if name == cfg.targets_for:
            out["targets"] = {g: targets(out["generators"][g]["audit"], cfg) for g in out["ranking"]}
    out["synthetic"] = synthetic_rows(exp_dir, exp)
    grid_stages = {k: v for k, v in stages.items() if k.startswith("classification")}
    out["grid_wall_s"] = sum(v["wall_s"] for v in grid_stages.values())
    out["compute_s"] = sum(v["wall_s"] for v in stages.values())
    return out


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def experiment_markdown(e: dict[str, Any]) -> list[str]:
    md = [f"## {e['title']}", ""]
    md.append(f"`python scripts/run_experiment.py {e['config']}` (config at commit {e['config_commit']}"
              + (f", code {e['code_version']}" if e.get("code_version") else "") + f"); folder `{Path(e['exp_dir']).relative_to(PROJECT_ROOT) if Path(e['exp_dir']).is_relative_to(PROJECT_ROOT) else e['exp_dir']}` (not committed). "
              + ("" if e["finished"] else "**The experiment has not finished: reported as far as its stage records "
                 "go.** ")
              + f"Compute time of its stages so far: {e['compute_s'] / 60:.1f} min.")
    md.append("")
    gens = e["generators"]
    if not gens:
        return [*md, "No generator stage has finished yet.", ""]
    md += ["### Training", "",
           "Wall-clock: the experiment's stage record (the whole stage process: start-up, training, export, "
           "sample grid); steps: optimizer steps (a DCGAN step trains D once and G once).", "",
           "Timed alone: the same stage (same hash) run on its own by `benchmarks/bench_stage.py` "
           "(`stage_<experiment>_<generator>.md`, with its load average), where that file exists.", "",
           "| generator | overrides of the stage | steps | epochs | wall-clock (min) | timed alone (min) |",
           "|---|---|---|---|---|---|"]
    for g, x in gens.items():
        alone = x.get("alone")
        alone_md = f"{alone['wall_s'] / 60:.1f} (load {alone['loadavg_after'][0]:.1f})" if alone else "-"
        md.append(f"| {g} | `{' '.join(x['overrides'])}` | {x['steps']} | {x['epochs']} | {x['wall_s'] / 60:.1f} | "
                  f"{alone_md} |")
    vae = gens.get("vae", {}).get("reconstruction")
    if vae and vae.get("val_psnr") is not None:
        md += ["", f"VAE reconstruction of the validation split (never trained on; [0, 1] scale, z = posterior mean): "
                   f"MSE {vae['val_mse']:.4f}, PSNR {vae['val_psnr']:.2f} dB, SSIM {vae['val_ssim']:.3f}."]
    sampled = {g: x for g, x in gens.items() if "samples" in x}
    if sampled:
        first = next(iter(sampled.values()))["samples"]
        md += ["", f"### Sample statistics (the {first['n_fake']} audited samples vs the {first['n_real']} real "
                   "validation images)", "",
               "Pixel values on [0, 1]. Diversity ratio: mean pairwise distance of the samples / of the real images "
               "(near 0: collapse), overall and within each class (fakes of a class vs real images of that class). "
               "Histogram L1: 32-bin intensity histograms (0 identical, 2 disjoint).", ""]
        classes = sorted({c for x in sampled.values() for c in x["samples"].get("per_class", {})},
                         key=lambda c: list(next(iter(sampled.values()))["samples"].get("per_class", {})).index(c)
                         if c in next(iter(sampled.values()))["samples"].get("per_class", {}) else 99)
        md += ["| source | mean | std | diversity ratio | " + " | ".join(f"ratio within {c}" for c in classes)
               + " | histogram L1 |", "|---|---|---|---|" + "---|" * len(classes) + "---|",
               f"| real validation images | {first['real_mean']:.3f} | {first['real_std']:.3f} | 1 | "
               + " | ".join("1" for _ in classes) + " | 0 |"]
        for g, x in sampled.items():
            s = x["samples"]
            per = s.get("per_class", {})
            md.append(f"| {g} | {s['mean']:.3f} | {s['std']:.3f} | {s['diversity_ratio']:.3f} | "
                      + " | ".join(_f(per.get(c, {}).get("diversity_ratio")) for c in classes)
                      + f" | {s['histogram_l1']:.3f} |")
    audited = [g for g in e.get("ranking", [])]
    if audited:
        a0 = gens[audited[0]]["audit"]
        md += ["", "### Audit (best first)", "",
               f"{a0['n_fake']} samples per generator (class mix below) against real training images in the "
               f"**{a0['feature_space']}** feature space ({a0['n_per_side']} a side for the distribution metrics); "
               f"real-vs-real baseline in brackets. Order: {e['ranking_rule']}. Fixed-budget D loss in nats (ln 2 = "
               "0.693 is chance, higher = harder to tell from real); AUC: the cross-fitted fine-tuned discriminator.",
               "", "| generator | fixed-budget D loss | AUC | FID | FID / baseline | KID | precision | recall | density "
               "| coverage | memorised |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in audited:
            a, b = gens[g]["audit"], gens[g]["audit"]["baseline"]
            md.append(f"| {g} | {_f(a['probe_loss'])} ({_f(a['probe_baseline'])}) | {a['auc']:.3f} | "
                      f"{a['fid']:.2f} ({b['fid']:.2f}) | {a['fid_ratio']:.1f} | {a['kid']:.4f} ({b['kid']:.4f}) | "
                      f"{a['precision']:.3f} ({b['precision']:.3f}) | {a['recall']:.3f} ({b['recall']:.3f}) | "
                      f"{a['density']:.3f} ({b['density']:.3f}) | {a['coverage']:.3f} ({b['coverage']:.3f}) | "
                      f"{a['memorised']} / {a['n_fake']} |")
        classes = list(a0["per_class"])
        mix = a0.get("real_per_class") or {}
        if mix and sum(mix.values()):
            total = sum(mix.values())
            fmix = {g: gens[g]["audit"].get("fake_per_class") or {} for g in audited}
            same = all(f and abs(f.get(c, 0) / sum(f.values()) - k / total) < 0.01
                       for f in fmix.values() for c, k in mix.items())
            md += ["", "Real training images per class: " + ", ".join(
                f"{c} {k} ({100 * k / total:.0f}%)" for c, k in mix.items()) + "; " + (
                "the fakes are drawn in the same class mix (`generative/sample.py mix=data`), so the overall "
                "FID / KID / PRDC and the discriminators compare like with like." if same else
                "fakes per class: " + "; ".join(f"{g} " + ", ".join(f"{c} {k}" for c, k in f.items())
                                                for g, f in fmix.items()) + ": the overall FID / KID / PRDC (and "
                "the discriminators) also measure that difference in class mix; the per-class numbers below "
                "compare like with like.")]
        if classes:
            md += ["", "Per class (fakes of the class against real images of the class; FID real-vs-real in "
                       "brackets):", "", "| generator | " + " | ".join(f"{c}: FID | {c}: recall | {c}: coverage"
                                                                    for c in classes) + " |",
                   "|---|" + "---|---|---|" * len(classes)]
            for g in audited:
                pc = gens[g]["audit"]["per_class"]
                md.append(f"| {g} | " + " | ".join(
                    f"{pc[c]['fid']:.2f} ({pc[c]['fid_baseline']:.2f}) | {pc[c]['recall']:.3f} | {pc[c]['coverage']:.3f}"
                    if c in pc else "- | - | -" for c in classes) + " |")
    if e.get("targets"):
        best = e["best"]
        md += ["", f"### Targets (issue 17) for the best generator: **{best}**", "",
               "| target | " + " | ".join(e["ranking"]) + " |", "|---|" + "---|" * len(e["ranking"])]
        for i, t in enumerate(e["targets"][best]):
            cells = []
            for g in e["ranking"]:
                tg = e["targets"][g][i]
                cells.append(f"{tg['shown']}: {'met' if tg['met'] else 'not met'}")
            md.append(f"| {t['target']} | " + " | ".join(cells) + " |")
        met = all(t["met"] for t in e["targets"][best])
        md += ["", f"Best generator ({best}): {'all targets met' if met else 'not all targets met'} "
                   f"({sum(t['met'] for t in e['targets'][best])} of {len(e['targets'][best])})."]
    grids = {g: x for g, x in gens.items() if "grid" in x}
    if grids:
        md += ["", "### Sample grids", "",
               "Per class (" + ", ".join(next(iter(grids.values()))["grid"]["classes"]) + "): one row of real "
               "training images above two rows of generated ones.", ""]
        for g, x in grids.items():
            rel = Path(x["grid"]["path"]).relative_to("docs") if x["grid"]["path"].startswith("docs/") else x["grid"]["path"]
            md += [f"**{g}** ({x['grid']['bytes'] / 1024:.0f} KB): ![{e['name']} {g}](../../docs/{rel})", ""]
            if x.get("observation"):
                md += [f"By eye: {x['observation']}", ""]
    syn = e.get("synthetic") or []
    if syn:
        md += ["### Do synthetic images help? scratch + synthetic - scratch", "",
               "Test AUC of `scratch` trained with each generator's class-conditional samples added to its labelled "
               "training images (validation and test untouched) minus `scratch` without them: same cells (regime, "
               "label fraction, seeds); gap [95% CI] from the experiment report (paired bootstrap of the "
               "seed-averaged test predictions + seed spread, not adjusted for multiplicity).", "",
               "| arm | synthetic | label fraction | with (mean AUC) | without | gap [95% CI] | p | verdict |",
               "|---|---|---|---|---|---|---|---|"]
        for r in syn:
            lo, hi = r["ci"]
            md.append(f"| {r['arm']} | `{r['synthetic']}` | {r['budget']:g} | {r['arm_mean']:.3f} (n={r['n'][0]}) | "
                      f"{r['base_mean']:.3f} (n={r['n'][1]}) | {r['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                      f"{r['p_value']:.2g} | {r['verdict']} |")
        md += ["", f"Fine-tuning grid wall-clock (all its arms): {e['grid_wall_s'] / 60:.1f} min."]
    elif e["finished"]:
        md += ["No scratch + synthetic comparison in this experiment."]
    else:
        md += ["The fine-tuning grid (scratch + synthetic vs scratch) has not finished."]
    return [*md, ""]


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    md = ["# Generative benchmark: class-conditional VAE, DCGAN and DDPM on a CPU budget (issue 17)", "",
          f"Written by `benchmarks/bench_generative.py` (code {r['code_version']}) from the experiments' folders. "
          f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, no GPU" if not m.get("cuda") else
          f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, CUDA", ""]
    md[-2] += f"; torch {m['torch']}, diffusers {m.get('diffusers')}."
    if r.get("note"):
        md += [str(r["note"]).strip(), ""]
    for e in r["experiments"]:
        md += experiment_markdown(e)
    return "\n".join(md)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchConfig, argv)
    configs = [PROJECT_ROOT / c for c in cfg.experiments]
    for c in configs:
        if not c.is_file():
            raise FileNotFoundError(f"{c}: no such experiment file")
    if cfg.run:
        for c in configs:
            subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "run_experiment.py"), str(c)],
                           cwd=PROJECT_ROOT, check=True)
    obs_path = PROJECT_ROOT / cfg.observations
    observations = (yaml.safe_load(obs_path.read_text()) or {}) if obs_path.is_file() else {}
    from medpretrain.pipeline.report import machine

    results: dict[str, Any] = {"benchmark": "class-conditional generators on a CPU budget (issue 17)",
                               "settings": vars(cfg), "code_version": code_version(), "machine": machine(),
                               "note": observations.get("note", ""),
                               "experiments": [read_experiment(c, cfg, observations) for c in configs]}
    out = PROJECT_ROOT / cfg.out_dir
    atomic_write_text(out / f"{cfg.name}.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / f"{cfg.name}.md", report(results))
    print(f"wrote {out / (cfg.name + '.json')} and {out / (cfg.name + '.md')}")
    return results


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
