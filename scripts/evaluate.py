"""Evaluate a finished fine-tuning run on another data set, without retraining (cross-dataset use).

    python scripts/evaluate.py eval_only=<finetune/run.py output folder> data.dataset=<spec> [split=whole] [key=value ...]
    accelerate launch scripts/evaluate.py eval_only=runs/finetune/segmentation/scratch/full/nall/seed0 \\
        data.dataset=segpairs:chase/images,chase/masks data.derive_fov=true split=whole

The run's model and the threshold it chose on its own validation split are applied unchanged to the test
split (``split=test``) or every image (``split=whole``) of ``data.dataset``; the config is the run's
``config.yaml`` with data / inference overrides only. Outputs as a fine-tuning run's (``results.json`` with
``evaluated_from``, ``predictions.npz``, ``config.yaml``, ``overlays.png``) in ``output_dir``, default
``<run>/evaluated/<data set>-<split>-<hash>``. A model of another architecture or input channels, or a data
set of another task or classes, is refused in one line. The logic: :mod:`medpretrain.evaluate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medpretrain import evaluate
from medpretrain.results import RunResult
from medpretrain.stage import start_stage


def main(argv: list[str] | None = None) -> RunResult:
    opts, overrides = evaluate.split_argv(sys.argv[1:] if argv is None else list(argv))
    run_dir = Path(opts.eval_only).expanduser().resolve()
    cfg = evaluate.evaluation_config(run_dir, overrides)
    source = evaluate.source_run(run_dir)  # refused before any data is read
    out = Path(cfg.output_dir).resolve() if cfg.output_dir else evaluate.default_output(run_dir, cfg.data.dataset,
                                                                                        opts.split)
    evaluate.check_output(out)
    cfg.output_dir = str(out)
    stage = start_stage("evaluate", cfg, out_dir=str(out.parent), run_name=out.name, resume="", seed=cfg.seed,
                        log_with=None, done_file="results.json", folder_key="output_dir")
    accelerator = stage.accelerator
    accelerator.print(f"evaluating {run_dir} ({source.init_label} / {source.regime}, trained on "
                      f"{(source.data or {}).get('dataset')}) on the {opts.split} split of {cfg.data.dataset}")
    result = evaluate.evaluate_run(run_dir, cfg, opts.split, accelerator, out)
    assert result.metrics is not None
    accelerator.print(f"{result.headline} {result.score:.4f} here vs {source.score:.4f} on its own test split; "
                      + " ".join(f"{k} {v:.4f}" for k, v in result.metrics["test"].items()) + f"\nwrote {out}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
