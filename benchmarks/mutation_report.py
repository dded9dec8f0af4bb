"""Summarise a finished ``mutmut run`` into ``benchmarks/results/mutation.md`` and ``mutation.json``.

    bash scripts/mutation.sh                 # runs mutmut, then this
    .venv/bin/python benchmarks/mutation_report.py

Counts per mutated module (killed / survived / no tests / timeout / other), the mutation score
(killed / (killed + survived + timeout); "no tests" mutants are reported apart: no selected test
calls that function), and every survivor with its one-line diff and the verdict of the review in
``benchmarks/mutation_review.yaml`` (``equivalent``: the mutant cannot change any result;
``accepted``: a real gap we leave, with the reason; survivors not in the review are listed as
``not reviewed``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REVIEW = ROOT / "benchmarks" / "mutation_review.yaml"
MUTMUT = [sys.executable, "-m", "mutmut"]
LINE = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>.+)$")


def mutmut(*args: str) -> str:
    return subprocess.run([*MUTMUT, *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _diff_reader() -> Callable[[str], str]:
    """``mutmut show``'s diff of one mutant: in-process through mutmut's own function when this mutmut has it
    (milliseconds per mutant), else one ``mutmut show`` subprocess per mutant (about a second each)."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
    except ImportError:
        return lambda name: mutmut("show", name)
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ relative to the working directory
    return get_diff_for_mutant


def module_of(name: str) -> str:
    mod, _, fn = name.rpartition(".x_")
    return mod if mod else name.split(".x")[0]


def function_of(name: str) -> str:
    fn = name.rpartition(".x_")[2]
    return re.sub(r"__mutmut_\d+$", "", fn).replace("ǁ", ".")


def diff_line(name: str, show: Callable[[str], str]) -> str:
    """The mutated line as ``- old`` / ``+ new`` (first changed pair of ``mutmut show``)."""
    out = show(name)
    minus = next((ln[1:].strip() for ln in out.splitlines() if ln.startswith("-") and not ln.startswith("---")), "")
    plus = next((ln[1:].strip() for ln in out.splitlines() if ln.startswith("+") and not ln.startswith("+++")), "")
    return f"`{minus}` → `{plus}`"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--note", default="", help="a sentence added under the title (e.g. how the run was made)")
    args = parser.parse_args(argv)
    rows = [m.groupdict() for m in map(LINE.match, mutmut("results", "--all", "true").splitlines()) if m]
    if not rows:
        raise SystemExit("no mutmut results: run `bash scripts/mutation.sh` first")
    review = yaml.safe_load(REVIEW.read_text()) if REVIEW.exists() else {}
    review = review or {}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    show = _diff_reader()
    for r in rows:
        status = r["status"].strip()
        counts[module_of(r["name"])][status] += 1
        if status == "survived":
            v = review.get(r["name"], {})
            survivors.append({"name": r["name"], "function": function_of(r["name"]), "diff": diff_line(r["name"], show),
                              "verdict": v.get("verdict", "not reviewed"), "why": v.get("why", "")})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "medpretrain", "tests"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if dirty:
        commit += " (with uncommitted changes to medpretrain/ or tests/)"
    names = {r["name"] for r in rows}
    stale = sorted(k for k in review if k not in names or k not in {s["name"] for s in survivors})
    total = collections.Counter()
    for c in counts.values():
        total.update(c)

    def score(c: collections.Counter) -> float:
        den = c["killed"] + c["survived"] + c["timeout"]
        return c["killed"] / den if den else float("nan")

    data = {"commit": commit, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "mutmut": mutmut("--version").strip(),
            "modules": {m: dict(c) for m, c in sorted(counts.items())}, "total": dict(total),
            "score": score(total), "note": args.note, "survivors": survivors, "stale_review_entries": stale}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(data, indent=1) + "\n")
    verdicts = collections.Counter(s["verdict"] for s in survivors)
    md = ["# Mutation testing of the numerical core", "",
          f"`bash scripts/mutation.sh` ({data['mutmut']}, Python {data['python']}) at commit `{commit}`, "
          f"{data['created']}. Mutated modules and the tests run against them: `[tool.mutmut]` in `pyproject.toml`. "
          "Score = killed / (killed + survived + timeout); *no tests*: no selected test calls the mutated function "
          "(not counted in the score)." + (f" {args.note}" if args.note else ""), "",
          "| module | killed | survived | timeout | no tests | score |", "|---|---|---|---|---|---|"]
    for m, c in sorted(counts.items()):
        md.append(f"| `{m}` | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | {score(c):.1%} |")
    md.append(f"| **all** | {total['killed']} | {total['survived']} | {total['timeout']} | {total['no tests']} "
              f"| **{score(total):.1%}** |")
    md += ["", f"Survivors reviewed: {sum(v for k, v in verdicts.items() if k != 'not reviewed')} of {len(survivors)} "
           f"({', '.join(f'{k}: {v}' for k, v in sorted(verdicts.items()))}). Verdicts live in "
           "`benchmarks/mutation_review.yaml`: *equivalent*, the mutant cannot change any result; *accepted*, a real "
           "but minor gap left without a test, with the reason."
           + (f" Review entries that are no longer survivors (killed since, or renamed): {len(stale)}." if stale else ""),
           "", "| module | " + " | ".join(sorted(verdicts)) + " |", "|---|" + "---|" * len(verdicts)]
    for m in sorted(counts):
        by = collections.Counter(s["verdict"] for s in survivors if module_of(s["name"]) == m)
        md.append(f"| `{m}` | " + " | ".join(str(by[v]) for v in sorted(verdicts)) + " |")
    md += ["", "| mutant | function | change | verdict | why |", "|---|---|---|---|---|"]
    for s in survivors:
        change, why = (t.replace("|", "\\|") for t in (s["diff"], s["why"]))
        md.append(f"| `{s['name'].rsplit('__mutmut_', 1)[-1]}` | `{module_of(s['name'])}.{s['function']}` | "
                  f"{change} | {s['verdict']} | {why} |")
    (RESULTS / "mutation.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'mutation.md'}: score {score(total):.1%}, {len(survivors)} survivors")


if __name__ == "__main__":
    main()
