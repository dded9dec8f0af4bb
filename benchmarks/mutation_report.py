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

import collections
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REVIEW = ROOT / "benchmarks" / "mutation_review.yaml"
MUTMUT = [sys.executable, "-m", "mutmut"]
LINE = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>.+)$")


def mutmut(*args: str) -> str:
    return subprocess.run([*MUTMUT, *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def module_of(name: str) -> str:
    mod, _, fn = name.rpartition(".x_")
    return mod if mod else name.split(".x")[0]


def function_of(name: str) -> str:
    fn = name.rpartition(".x_")[2]
    return re.sub(r"__mutmut_\d+$", "", fn).replace("ǁ", ".")


def diff_line(name: str) -> str:
    """The mutated line as ``- old`` / ``+ new`` (first changed pair of ``mutmut show``)."""
    out = mutmut("show", name)
    minus = next((ln[1:].strip() for ln in out.splitlines() if ln.startswith("-") and not ln.startswith("---")), "")
    plus = next((ln[1:].strip() for ln in out.splitlines() if ln.startswith("+") and not ln.startswith("+++")), "")
    return f"`{minus}` → `{plus}`"


def main() -> None:
    rows = [m.groupdict() for m in map(LINE.match, mutmut("results", "--all", "true").splitlines()) if m]
    if not rows:
        raise SystemExit("no mutmut results: run `bash scripts/mutation.sh` first")
    review = yaml.safe_load(REVIEW.read_text()) if REVIEW.exists() else {}
    review = review or {}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for r in rows:
        status = r["status"].strip()
        counts[module_of(r["name"])][status] += 1
        if status == "survived":
            v = review.get(r["name"], {})
            survivors.append({"name": r["name"], "function": function_of(r["name"]), "diff": diff_line(r["name"]),
                              "verdict": v.get("verdict", "not reviewed"), "why": v.get("why", "")})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    total = collections.Counter()
    for c in counts.values():
        total.update(c)

    def score(c: collections.Counter) -> float:
        den = c["killed"] + c["survived"] + c["timeout"]
        return c["killed"] / den if den else float("nan")

    data = {"commit": commit, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "mutmut": mutmut("--version").strip(),
            "modules": {m: dict(c) for m, c in sorted(counts.items())}, "total": dict(total),
            "score": score(total), "survivors": survivors}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(data, indent=1) + "\n")
    verdicts = collections.Counter(s["verdict"] for s in survivors)
    md = ["# Mutation testing of the numerical core", "",
          f"`bash scripts/mutation.sh` ({data['mutmut']}, Python {data['python']}) at commit `{commit}`, "
          f"{data['created']}. Mutated modules and the tests run against them: `[tool.mutmut]` in `pyproject.toml`. "
          "Score = killed / (killed + survived + timeout); *no tests*: no selected test calls the mutated function "
          "(not counted in the score).", "",
          "| module | killed | survived | timeout | no tests | score |", "|---|---|---|---|---|---|"]
    for m, c in sorted(counts.items()):
        md.append(f"| `{m}` | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | {score(c):.1%} |")
    md.append(f"| **all** | {total['killed']} | {total['survived']} | {total['timeout']} | {total['no tests']} "
              f"| **{score(total):.1%}** |")
    md += ["", f"Survivors reviewed: {sum(v for k, v in verdicts.items() if k != 'not reviewed')} of {len(survivors)} "
           f"({', '.join(f'{k}: {v}' for k, v in sorted(verdicts.items()))}). Verdicts live in "
           "`benchmarks/mutation_review.yaml`.", "", "| mutant | function | change | verdict | why |",
           "|---|---|---|---|---|"]
    for s in survivors:
        change, why = (t.replace("|", "\\|") for t in (s["diff"], s["why"]))
        md.append(f"| `{s['name'].rsplit('__mutmut_', 1)[-1]}` | `{module_of(s['name'])}.{s['function']}` | "
                  f"{change} | {s['verdict']} | {why} |")
    (RESULTS / "mutation.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'mutation.md'}: score {score(total):.1%}, {len(survivors)} survivors")


if __name__ == "__main__":
    main()
