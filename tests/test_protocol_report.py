"""benchmarks/protocol_report.py: sections of experiments whose runs are not on this machine are kept from the
earlier report, verbatim and marked, instead of silently dropped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from medpretrain.pipeline.report import experiment_sections

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("protocol_report", ROOT / "benchmarks" / "protocol_report.py")
pr = importlib.util.module_from_spec(spec)
sys.modules["protocol_report"] = pr
spec.loader.exec_module(pr)

EARLIER = """# Protocol: the shipped CPU experiments (issue 14)

Generated 2026-12-02 06:24 UTC by `benchmarks/protocol_report.py` (code x) from the experiments' own results.

## PneumoniaMNIST (28 px): old

`python scripts/run_experiment.py configs/experiments/pneumonia.yaml`; report written 2026-12-02T02:58 UTC.

| a | b |
|---|---|
| old pneumonia | 0.9 |

## BUSI ultrasound

`python scripts/run_experiment.py configs/experiments/busi.yaml`; report written 2026-12-02T03:56 UTC.

BUSI body, with a ### sub-heading below

### detail

text

## DRIVE

`python scripts/run_experiment.py configs/experiments/drive.yaml`; report written 2026-12-02T06:10 UTC.

DRIVE body
"""


def test_sections_are_found_by_the_experiment_their_header_names() -> None:
    found = experiment_sections(EARLIER, "##")
    assert sorted(found) == ["busi", "drive", "pneumonia"]
    assert found["busi"].startswith("## BUSI ultrasound\n\n`python scripts/run_experiment.py configs/experiments/busi")
    assert found["busi"].endswith("### detail\n\ntext") and "DRIVE" not in found["busi"]
    assert found["drive"].endswith("DRIVE body")


def test_missing_experiments_keep_their_earlier_section_marked_as_kept(tmp_path: Path) -> None:
    old = tmp_path / "protocol.md"
    old.write_text(EARLIER)
    new = "# Protocol\n\n## PneumoniaMNIST (28 px): new\n\nnew body"
    text = pr.carry_over(old, new, ["busi", "drive"])
    assert text.startswith(new) and "old pneumonia" not in text
    assert text.count("its runs are not on this machine") == 2
    assert "> Kept from an earlier publication of `busi` (its runs are not on this machine; the section below is " \
           "the earlier report's, 2026-12-02 06:24 UTC).\n\n## BUSI ultrasound" in text
    assert text.index("## BUSI") < text.index("## DRIVE") and text.endswith("DRIVE body")
    assert pr.carry_over(old, new, []) == new and pr.carry_over(tmp_path / "none.md", new, ["busi"]) == new


def test_main_keeps_the_json_summaries_of_missing_experiments(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "protocol.md").write_text(EARLIER)
    (out / "imagenet.md").write_text(EARLIER)
    (out / "protocol.json").write_text(json.dumps([{"name": "busi", "x": 1}, {"name": "drive", "x": 2}]))
    runs = tmp_path / "runs"
    runs.mkdir()
    assert pr.main([str(runs), "--out", str(out)]) == 1  # nothing finished here: nothing is rewritten
    assert (out / "protocol.md").read_text() == EARLIER


def test_publish_readme_keeps_the_sections_of_experiments_not_republished(tmp_path: Path, monkeypatch) -> None:
    """README's results block: publishing one experiment replaces its section and keeps the others verbatim
    (marked), in their order; publishing again does not pile up the marker lines; keep=False drops them."""
    from medpretrain.pipeline import report

    def section(name: str, body: str) -> list[str]:
        return [f"### {name} title", "", f"`python scripts/run_experiment.py configs/experiments/{name}.yaml` - x",
                "", body]

    monkeypatch.setattr(report, "readme_section", lambda d, assets: section(d.name, f"new {d.name}"))
    old = "\n".join([report.README_BEGIN, "", "> old note", "", *section("pneumonia", "old pneumonia"), "",
                     *section("busi", "old busi"), "", *section("drive", "old drive"), report.README_END])
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n\n{old}\n\n## tail\n")
    report.publish_readme(readme, [tmp_path / "pneumonia"], ["new note"])
    text = readme.read_text()
    assert text.startswith("# head\n\n") and text.endswith("\n\n## tail\n") and "old note" not in text
    assert "old pneumonia" not in text and text.index("new pneumonia") < text.index("old busi") < text.index("old drive")
    assert "> Kept from an earlier publication of `busi` (not re-published here).\n\n### busi title" in text
    report.publish_readme(readme, [tmp_path / "pneumonia"], ["new note"])
    assert readme.read_text() == text  # idempotent: one marker per kept section
    report.publish_readme(readme, [tmp_path / "busi"], keep=False)
    assert "new busi" in readme.read_text() and "drive" not in readme.read_text().split("## tail")[0]


def test_keeping_a_kept_section_again_does_not_pile_up_markers(tmp_path: Path) -> None:
    old = tmp_path / "protocol.md"
    old.write_text(EARLIER)
    new = "# Protocol\n\nGenerated 2026-12-03 10:00 UTC by x.\n\n## PneumoniaMNIST (28 px): new\n\nnew body"
    once = pr.carry_over(old, new, ["busi", "drive"])
    old.write_text(once)
    twice = pr.carry_over(old, new, ["busi", "drive"])
    assert twice.count("Kept from an earlier publication") == 2
    assert experiment_sections(twice, "##")["busi"] == experiment_sections(EARLIER, "##")["busi"]
    assert experiment_sections(twice, "##")["drive"].endswith("DRIVE body")


def test_the_older_kept_marker_is_not_carried_into_a_section() -> None:
    """protocol.md / imagenet.md of 2026-12-02 marked kept sections with '> <name>: its runs are not on this
    machine; ...': read again, that line is not part of the section above it."""
    older = EARLIER.replace("\n## DRIVE", "\n> drive: its runs are not on this machine; the section below is kept "
                                          "verbatim from the earlier report (2026-12-02 06:24 UTC).\n\n## DRIVE")
    found = experiment_sections(older, "##")
    assert found["busi"] == experiment_sections(EARLIER, "##")["busi"] and "its runs" not in found["busi"]


def test_target_overview_takes_each_budgets_best_self_supervised_arm_across_experiments() -> None:
    """The 100%-label target can be met by pneumonia_px64's 64 px arm while pneumonia's 28 px arm misses it: the
    overview names the best arm and its experiment per label fraction, and says whether it meets the target."""
    def t(init: str, budget: float, mean: float) -> dict:
        return {"init": init, "budget": budget, "target": {0.01: 0.85, 1.0: 0.96}[budget], "mean": mean,
                "std": 0.01, "n": 3, "met": mean >= {0.01: 0.85, 1.0: 0.96}[budget]}

    summaries = [{"name": "pneumonia", "targets": [t("simclr", 0.01, 0.89), t("moco", 0.01, 0.84),
                                                     t("simclr", 1.0, 0.94)]},
                 {"name": "pneumonia_px64", "targets": [t("simclr@px64", 1.0, 0.962)]},
                 {"name": "busi", "targets": []}]
    rows = pr.target_overview(summaries)
    assert [(r["budget"], r["init"], r["experiment"], r["met"]) for r in rows] == [
        (0.01, "simclr", "pneumonia", True), (1.0, "simclr@px64", "pneumonia_px64", True)]
    rows = pr.target_overview(summaries[:1])
    assert [(r["init"], r["met"]) for r in rows] == [("simclr", True), ("simclr", False)]


def test_a_kept_experiments_targets_count_in_the_overview() -> None:
    """pneumonia re-run while pneumonia_px64's runs are not on the machine: its kept summary (protocol.json) still
    meets the 100%-label target, so the overview must not say the target is missed."""
    def t(init: str, budget: float, mean: float) -> dict:
        return {"init": init, "budget": budget, "target": 0.96, "mean": mean, "std": 0.01, "n": 3, "met": mean >= 0.96}

    now = {"name": "pneumonia", "targets": [t("simclr", 1.0, 0.929)]}
    kept = {"name": "pneumonia_px64", "targets": [t("simclr", 1.0, 0.963)]}
    overview = [line for line in pr.protocol_md([], [], [kept]).splitlines()
                if line.startswith("| 1 |")]
    assert overview == ["| 1 | 0.96 | simclr | pneumonia_px64 | 0.963 ± 0.010 (3) | yes |"]
    assert pr.target_overview([now, kept])[0]["experiment"] == "pneumonia_px64"
    assert pr.target_overview([now])[0]["met"] is False
