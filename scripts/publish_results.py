"""Write README.md's results section from finished experiments (never typed by hand).

    python scripts/publish_results.py runs/experiments/pneumonia runs/experiments/busi runs/experiments/drive
    python scripts/publish_results.py runs/experiments/drive note="The CPU was shared with other jobs."

Sections of experiments not named (their runs need not be on this machine) are kept verbatim under a line
that says so (:func:`medpretrain.pipeline.report.publish_readme`).

Reads each experiment's ``experiment.json`` (written by ``scripts/run_experiment.py``), copies its
label-efficiency plot to ``docs/results/<name>/label_efficiency.png`` (committed; ``runs/`` is not) and
replaces the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md with, per
experiment: the question, the recommendation table, the label-efficiency table, the plot, the audit
summary line, the machine, versions and wall-clock time (:func:`medpretrain.pipeline.report.publish_readme`).
"""

from __future__ import annotations

from pathlib import Path

from medpretrain.cli import UserError
from medpretrain.pipeline.report import publish_readme
from medpretrain.utils import PROJECT_ROOT


def main(argv: list[str]) -> Path:
    notes = [a.split("=", 1)[1] for a in argv if a.startswith("note=")]
    dirs = [Path(a) for a in argv if not a.startswith("note=")]
    if not dirs:
        raise UserError("name at least one experiment folder, e.g. "
                        "python scripts/publish_results.py runs/experiments/pneumonia")
    readme = publish_readme(PROJECT_ROOT / "README.md", dirs, notes)
    print(f"updated {readme} ({len(dirs)} experiment(s))")
    return readme


if __name__ == "__main__":
    from medpretrain.cli import run

    run(main)
