"""Job-seconds and CPU-seconds of a finished workflow run, per rule.

    python benchmarks/demo_time.py [outputs/benchmarks] [--compare OTHER_DIR]

Reads every Snakemake benchmark file under the folder (``<rule>/.../<job>.tsv``, one
row per repeat; the first path component below the folder names the rule) and prints,
per rule, the number of jobs and the sum and mean of the wall time (column ``s``) and
of ``cpu_time``, then the totals. Summed job-seconds say what a run costs whatever the
number of cores; ``cpu_time`` also leaves out the time a job waited for a core, which
makes it steadier than wall time on a shared machine.

Snakemake samples ``cpu_time`` every 0.5 s for a job's first 15 s and every 30 s after
that, so it misses up to 30 s of a long job's last stretch and up to 0.5 s of every
job: read it as a lower bound, and compare runs with different numbers of jobs by the
whole run's CPU as well (user + sys of ``/usr/bin/time -v snakemake ...``, which
includes every job). Benchmarks of several rules in one folder (``compare/<rule>.tsv``)
are summed under that folder's name. With ``--compare`` a second run's folder (e.g. one
kept from before a change) is printed beside the first, with the difference.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path


class BenchmarkError(ValueError):
    """A benchmark folder or file that cannot be read as Snakemake wrote it."""


@dataclass
class RuleTimes:
    """The jobs of one rule: wall and CPU seconds of each."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.wall)


def _number(value: str, column: str, path: Path) -> float:
    """A column's seconds; ``NA`` (Snakemake's mark for a job that ended before its
    sampler looked at it) counts as 0."""
    if value == "NA":
        return 0.0
    try:
        number = float(value)
    except ValueError:
        raise BenchmarkError(f"{path}: column {column!r} holds {value!r}, not a number: "
                             f"is this a Snakemake benchmark file?") from None
    return number if math.isfinite(number) else 0.0


def read_benchmarks(folder: Path) -> dict[str, RuleTimes]:
    """``{rule: RuleTimes}`` from every ``*.tsv`` under ``folder``, sorted by rule."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} is not a folder: give a run's benchmark folder (outputs/benchmarks)")
    rules: dict[str, RuleTimes] = {}
    for path in sorted(folder.rglob("*.tsv")):
        rule = path.relative_to(folder).parts[0]
        if rule == path.name:
            rule = path.stem  # a rule whose benchmark file lies directly in the folder
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows or "s" not in rows[0] or "cpu_time" not in rows[0]:
            raise BenchmarkError(f"{path} has no 's' and 'cpu_time' columns: is it a Snakemake benchmark file?")
        times = rules.setdefault(rule, RuleTimes())
        for row in rows:
            times.wall.append(_number(row["s"], "s", path))
            times.cpu.append(_number(row["cpu_time"], "cpu_time", path))
    if not rules:
        raise BenchmarkError(f"{folder} holds no benchmark files (*.tsv): has the run finished?")
    return dict(sorted(rules.items()))


def _line(name: str, times: RuleTimes | None) -> list[str]:
    if times is None or times.count == 0:
        return [name, "0", "", "", "", ""]
    wall, cpu = sum(times.wall), sum(times.cpu)
    return [name, str(times.count), f"{wall:.1f}", f"{wall / times.count:.2f}", f"{cpu:.1f}",
            f"{cpu / times.count:.2f}"]


def _total(rules: dict[str, RuleTimes]) -> RuleTimes:
    total = RuleTimes()
    for times in rules.values():
        total.wall += times.wall
        total.cpu += times.cpu
    return total


def table(rules: dict[str, RuleTimes], before: dict[str, RuleTimes] | None = None) -> str:
    """The per-rule table (and, with ``before``, that run's figures and the change)."""
    header = ["rule", "jobs", "wall_s", "mean_s", "cpu_s", "mean_cpu_s"]
    names = sorted(set(rules) | set(before or {}))
    lines = []
    for name in [*names, "TOTAL"]:
        now = _total(rules) if name == "TOTAL" else rules.get(name)
        line = _line(name, now)
        if before is not None:
            then = _total(before) if name == "TOTAL" else before.get(name)
            old = _line("", then)[1:]
            change = (sum(now.wall) if now else 0.0) - (sum(then.wall) if then else 0.0)
            cpu_change = (sum(now.cpu) if now else 0.0) - (sum(then.cpu) if then else 0.0)
            line += [*old, f"{change:+.1f}", f"{cpu_change:+.1f}"]
        lines.append(line)
    if before is not None:
        header += ["before_jobs", "before_wall_s", "before_mean_s", "before_cpu_s", "before_mean_cpu_s",
                   "d_wall_s", "d_cpu_s"]
    rows = [header, *lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="outputs/benchmarks", type=Path,
                        help="a finished run's benchmark folder (default: outputs/benchmarks)")
    parser.add_argument("--compare", type=Path, metavar="BEFORE",
                        help="another run's benchmark folder, shown beside this one with the change")
    args = parser.parse_args(argv)
    try:
        rules = read_benchmarks(args.folder)
        before = read_benchmarks(args.compare) if args.compare else None
    except (BenchmarkError, OSError) as error:
        print(f"demo_time: {error}", file=sys.stderr)
        return 1
    print(table(rules, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
