"""The findings of a study, written from its statistics: ``outputs/compare/findings.md``.

Every difference that is significant after the Benjamini–Hochberg correction in
``difference.csv`` (:func:`tga.compare.compute_differences`) becomes one plain sentence
with its effect, interval, adjusted p-value and number of seeds; the page also says how
many tests were run, how many were not significant, and how many rows were left out of
the tests as identical by construction. Prose about results can then quote these
sentences instead of reading more into a figure than its tests say. A difference a norm
sets (``construction`` = ``norm``) keeps its sentence, with the reason after it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tga.atomic import atomic_write_text
from tga.compare import COMPARISON_SEP, FAMILY_DESCRIPTION, IDENTICAL, NORM_EFFECT
from tga.stats import CORRECTION_NAME, CORRECTION_TEXT, INTERVAL_DESCRIPTION, TEST_DESCRIPTION
from tga.tables import stage_order, text_column

__all__ = ["findings_markdown", "finding_sentence", "write_findings"]

_METHOD_WORDS = {"paired": "paired by seed", "welch": "Welch, unpaired"}


def _num(value: float) -> str:
    """Three significant digits, signed where a sign carries meaning."""
    return f"{value:.3g}"


def _signed(value: float) -> str:
    return f"{value:+.3g}"


def _p_text(p: float) -> str:
    if p == 0.0:
        return "0 (the same difference at every seed)"
    return f"{p:.2g}"


def _stage_words(stage: str) -> str:
    if stage == "init":
        return "At initialization"
    if stage == "trained":
        return "After training"
    return f"At {stage}"


def _seed_words(row: pd.Series) -> str:
    method = _METHOD_WORDS.get(str(row["method"]), str(row["method"]))
    if row["method"] == "welch":
        return f"{int(row['n_a'])} vs {int(row['n_b'])} seeds, {method}"
    return f"{int(row['n_seeds'])} seeds, {method}"


def finding_sentence(row: pd.Series) -> str:
    """One significant row of ``difference.csv`` as a sentence: which way, by how much,
    the 95% interval, the effect size, the seeds and the adjusted p-value."""
    a, b, diff = str(row["a"]), str(row["b"]), float(row["mean_diff"])
    direction = "higher" if diff > 0 else "lower"
    effect = float(row["effect_size"])
    effect_text = ("no seed-to-seed spread" if math.isinf(effect)
                   else f"effect size {_num(effect)} seed-to-seed s.d.")
    sentence = (
        f"{_stage_words(str(row['stage']))}, `{row['metric']}` at `{row['layer_name']}` is {direction} in "
        f"{a} than in {b}: A − B = {_signed(diff)} (95% CI {_signed(float(row['ci_low']))} to "
        f"{_signed(float(row['ci_high']))}; {effect_text}; {_seed_words(row)}; "
        f"{CORRECTION_NAME}-adjusted p = {_p_text(float(row['p_adjusted']))})."
    )
    if str(row.get("construction", "")) == NORM_EFFECT:
        sentence += f" This is the norm's effect, by construction: {row['construction_note']}."
    return sentence


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def findings_markdown(differences: pd.DataFrame) -> str:
    """The findings page for a ``difference.csv`` table (as read back from the CSV)."""
    df = differences.copy()
    for column in ("construction", "construction_note", "missing"):
        df[column] = text_column(df, column)
    df["significant"] = df["significant"].astype(bool)
    tested = df[df["p_value"].notna() & (df["construction"] != IDENTICAL)]
    significant = tested[tested["significant"]]
    identical = df[df["construction"] == IDENTICAL]
    untested = df[df["p_value"].isna() & (df["construction"] != IDENTICAL) & (df["missing"] == "")]
    missing = df[df["missing"] != ""]
    n_families = int(tested.groupby(["comparison", "stage"]).ngroups)
    norm_significant = int((significant["construction"] == NORM_EFFECT).sum())

    lines = ["# Findings: significant differences A − B", ""]
    lines.append(
        f"Written from `difference.csv`. Each p-value is a {TEST_DESCRIPTION}; each interval is the "
        f"{INTERVAL_DESCRIPTION}. A difference is significant after {CORRECTION_TEXT}, applied within "
        f"each family of tests: {FAMILY_DESCRIPTION}."
    )
    lines.append("")
    summary = (
        f"{_count(len(tested), 'test was', 'tests were')} run in {_count(n_families, 'family', 'families')}: "
        f"{len(significant)} significant, {len(tested) - len(significant)} not significant. "
        f"{_count(len(identical), 'row was', 'rows were')} left out of the tests because A and B are identical "
        f"at every seed by construction."
    )
    if len(untested):
        summary += f" {_count(len(untested), 'row has', 'rows have')} no test (a single seed or no data)."
    if norm_significant:
        summary += (f" {_count(norm_significant, 'significant difference is', 'significant differences are')} "
                    f"set by a norm (marked below): they describe the norm, not the stream.")
    lines += [summary, ""]
    for comparison in dict.fromkeys(missing["comparison"]):
        names = ", ".join(dict.fromkeys(missing.loc[missing["comparison"] == comparison, "missing"]))
        lines += [f"Not compared: {comparison.replace(COMPARISON_SEP, ' − ')} (no data for {names}).", ""]
    if significant.empty:
        lines += ["No difference was significant.", ""]
    order = {c: i for i, c in enumerate(dict.fromkeys(df["comparison"]))}
    keys = sorted(significant.groupby(["comparison", "stage"]).groups,
                  key=lambda k: (order[k[0]], stage_order(k[1])))
    for comparison, stage in keys:
        rows = significant[(significant["comparison"] == comparison) & (significant["stage"] == stage)]
        n_family = int(rows["n_tests"].iloc[0])
        a, b = rows["a"].iloc[0], rows["b"].iloc[0]
        lines += [f"## {a} − {b}, {stage} ({len(rows)} of {n_family} tests significant)", ""]
        lines += [f"- {finding_sentence(row)}" for _, row in rows.iterrows()]
        lines.append("")
    return "\n".join(lines)


def write_findings(difference_csv: str | Path, out_md: str | Path) -> str:
    """``findings.md`` from ``difference.csv``, written whole or not at all."""
    text = findings_markdown(pd.read_csv(difference_csv))
    atomic_write_text(out_md, text)
    return text
