"""The findings page: one sentence per Benjamini–Hochberg-significant difference, and the
counts of tests, non-significant rows and rows left out by construction, all taken
from the difference table."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from tga import findings
from tga.compare import compute_differences
from tga.findings import findings_markdown, write_findings
from tga.stats import CORRECTION_TEXT, INTERVAL_DESCRIPTION

NAMES = {0: "embedding", 1: "block1", 2: "block2", 3: "final_norm"}
ARCHITECTURES = {"pre": {"norm_position": "pre", "norm": "rmsnorm"},
                 "post": {"norm_position": "post", "norm": "rmsnorm"}}


def _table(seed: int = 0) -> pd.DataFrame:
    """pre − post over 3 seeds at init: the embedding identical in both (as in tga's
    models), token_norm clearly lower in pre at every later layer (post's is its norm's
    √d), mean_cosine noise except a clear difference at block2."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(3):
        for layer, name in NAMES.items():
            shared = {"mean_cosine": rng.normal(0.3, 0.05), "token_norm": rng.normal(1.0, 0.05)}
            for variant in ("pre", "post"):
                for metric, value in shared.items():
                    if layer > 0:
                        if metric == "token_norm":
                            value = 5.66 + rng.normal(0, 0.001) if variant == "post" else 1.0 + layer + rng.normal(0, 0.1)
                        else:
                            value = value + rng.normal(0, 0.05) + (0.4 if variant == "pre" and layer == 2 else 0.0)
                    rows.append(dict(variant=variant, seed=s, stage="init", step=0, layer=layer, layer_name=name,
                                     metric=metric, mean=value, std=0.1, n_prompts=2))
    return compute_differences(pd.DataFrame(rows), [("pre", "post"), ("pre", "gone")],
                               ["mean_cosine", "token_norm"], ARCHITECTURES)


def test_one_sentence_per_significant_difference_with_its_statistics():
    table = _table()
    text = findings_markdown(table)
    significant = table[table["significant"]]
    sentences = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(sentences) == len(significant) >= 4
    for (_, row), sentence in zip(significant.iterrows(), sentences):
        assert f"`{row['metric']}` at `{row['layer_name']}`" in sentence
        assert ("higher" if row["mean_diff"] > 0 else "lower") in sentence
        assert f"A − B = {row['mean_diff']:+.3g}" in sentence
        assert f"95% CI {row['ci_low']:+.3g} to {row['ci_high']:+.3g}" in sentence
        assert f"adjusted p = {row['p_adjusted']:.2g}" in sentence and "3 seeds, paired by seed" in sentence
        assert ("norm's effect" in sentence) == (row["construction"] == "norm")
    assert "`mean_cosine` at `block2` is higher in pre than in post" in text
    # The page's method line takes its words from the code.
    assert CORRECTION_TEXT in text and INTERVAL_DESCRIPTION in text


def test_counts_of_tests_non_significant_and_by_construction():
    table = _table()
    text = findings_markdown(table)
    n_tested = int(table["tested"].sum())
    n_significant = int(table["significant"].sum())
    n_identical = int((table["construction"] == "identical").sum())
    assert n_identical == 2  # both metrics at the embedding
    assert f"{n_tested} tests were run in 1 family: {n_significant} significant, " \
           f"{n_tested - n_significant} not significant." in text
    assert f"{n_identical} rows were left out of the tests because A and B are identical" in text
    assert "Not compared: pre − gone (no data for gone)." in text


def test_a_raw_p_below_005_without_the_correction_gets_no_sentence():
    """Only the corrected flag makes a finding: a row significant before correction but
    not after has no sentence, and writing from raw p-values (the mutation) would add it."""
    table = _table()
    row = table.index[(table["metric"] == "mean_cosine") & (table["layer_name"] == "block1")][0]
    table.loc[row, ["p_value", "p_adjusted", "significant"]] = [0.03, 0.09, False]
    text = findings_markdown(table)
    assert "`mean_cosine` at `block1`" not in text
    broken = table.assign(significant=table["p_value"] < 0.05)
    assert "`mean_cosine` at `block1`" in findings_markdown(broken)


def test_no_significant_difference_says_so_and_the_file_round_trips(tmp_path):
    table = _table()
    quiet = table.assign(significant=False, p_adjusted=np.where(table["tested"], 0.5, np.nan))
    assert "No difference was significant." in findings_markdown(quiet)
    csv = tmp_path / "difference.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "compare" / "findings.md"
    text = write_findings(csv, out)
    assert out.read_text(encoding="utf-8") == text == findings_markdown(table)
    assert re.search(r"^## pre − post, init \(\d+ of \d+ tests significant\)$", text, flags=re.M)


@pytest.mark.parametrize("p, words", [(0.0, "0 (the same difference at every seed)"), (0.0123, "0.012")])
def test_p_value_words(p, words):
    assert findings._p_text(p) == words
