"""Run every science check on every mutant and write the result into docs/science.md.

    python benchmarks/science_mutation_table.py [--doc docs/science.md]

Each check (``tga.science.CHECK_CASES``) runs on its intact model and on each broken one
(``tga.science.MUTANTS``), the same definitions tests/test_science.py uses. A mutant either
breaks the check's statement, so the check should fail ("caught"; a pass is the check's
power limit, "missed"), or the case lists it as one the statement cannot see, with the
reason ("blind"; a failure there would be the check reaching beyond its statement). The
markdown table replaces what lies between the markers in the doc, so a rerun replaces it;
it names the date, device and CPU time. About 30 s of CPU on one thread.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from tga.atomic import atomic_write_text
from tga.science import CHECK_CASES, MUTANTS, CheckCase, CheckResult, Mutant, run_case

BEGIN = "<!-- BEGIN science_mutation_table (benchmarks/science_mutation_table.py writes this) -->"
END = "<!-- END science_mutation_table -->"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(case: CheckCase, mutant: Mutant | None, result: CheckResult) -> str:
    """One cell: the check's verdict and what it means for this mutant."""
    if mutant is None:
        return "passes" if result.passed else "**FAILS on the intact model**"
    if mutant.name in case.blind:
        return "passes (blind)" if result.passed else "fails (beyond the statement)"
    return "passes (**missed**)" if result.passed else "**fails** (caught)"


def run_all() -> dict[tuple[str, str], CheckResult]:
    """(case name, mutant name or "intact") -> result, for every check and mutant."""
    results = {}
    for case in CHECK_CASES:
        results[case.name, "intact"] = run_case(case)
        for mutant in MUTANTS:
            results[case.name, mutant.name] = run_case(case, mutant)
            print(f"{case.name} / {mutant.name}: {results[case.name, mutant.name].reason}", flush=True)
    return results


def markdown(results: dict[tuple[str, str], CheckResult], header: str) -> str:
    """The matrix (mutants x checks), the blind reasons it refers to, and every cell's
    reason in a collapsed list."""
    reasons: dict[str, int] = {}  # each distinct blind reason, numbered in order of appearance
    lines = [header, "", "| mutant | " + " | ".join(case.title for case in CHECK_CASES) + " |",
             "|---|" + "---|" * len(CHECK_CASES)]
    lines.append("| intact | " + " | ".join(verdict(c, None, results[c.name, "intact"]) for c in CHECK_CASES) + " |")
    for mutant in MUTANTS:
        cells = []
        for case in CHECK_CASES:
            cell = verdict(case, mutant, results[case.name, mutant.name])
            if mutant.name in case.blind:
                number = reasons.setdefault(case.blind[mutant.name], len(reasons) + 1)
                cell += f" [{number}]"
            cells.append(cell)
        description = mutant.description.replace("|", "\\|")  # a bare | would split the cell
        lines.append(f"| `{mutant.name}`: {description} | " + " | ".join(cells) + " |")
    lines += ["", "Why a check cannot see a mutant (the number in a cell):", ""]
    lines += [f"{number}. {reason}" for reason, number in reasons.items()]
    lines += ["", "<details><summary>Every cell's reason, as the check gives it</summary>", ""]
    for case in CHECK_CASES:
        lines.append(f"**{case.title}** (`{case.name}`)")
        lines.append("")
        for name in ["intact", *(m.name for m in MUTANTS)]:
            result = results[case.name, name]
            lines.append(f"- `{name}`: {'passes' if result.passed else 'fails'}: `{result.reason}`")
        lines.append("")
    lines.append("</details>")
    return "\n".join(lines)


def replace_between_markers(text: str, body: str, doc: Path) -> str:
    """``text`` with what lies between BEGIN and END replaced by ``body``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{doc}: needs exactly one line {BEGIN!r} followed by one line {END!r}; "
                         "add them where the table belongs")
    before, rest = text.split(BEGIN)
    after = rest.split(END)[1]
    return f"{before}{BEGIN}\n{body}\n{END}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=Path("docs/science.md"))
    args = parser.parse_args()
    if not args.doc.is_file():
        raise SystemExit(f"{args.doc}: no such file; --doc names the page that holds the table's markers")
    text = args.doc.read_text()
    replace_between_markers(text, "", args.doc)  # fail on missing markers before the run, not after
    torch.set_num_threads(1)
    start = time.process_time()
    results = run_all()
    seconds = time.process_time() - start
    header = (f"Measured {datetime.date.today().isoformat()} on {cpu_name()} (CPU, one thread, torch "
              f"{torch.__version__}), {seconds:.0f} s of CPU; {len(CHECK_CASES)} checks x {len(MUTANTS)} mutants.")
    atomic_write_text(args.doc, replace_between_markers(text, markdown(results, header), args.doc))
    print(f"wrote {args.doc} ({seconds:.0f} s CPU)")


if __name__ == "__main__":
    main()
