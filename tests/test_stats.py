"""Statistics across seeds: intervals and tests against hand computations, the
Benjamini–Hochberg correction, and the difference table the figures draw from."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tga.compare import DIFFERENCE_COLUMNS, compute_differences
from tga.stats import adjust_pvalues, mean_ci95, paired_difference, welch_difference

T975 = {2: 4.302653, 4: 2.776445}


def test_mean_ci95_hand_values():
    m, lo, hi, n = mean_ci95([1.0, 2.0, 3.0, np.nan])
    half = T975[2] * 1.0 / math.sqrt(3)
    assert (m, n) == (2.0, 3)
    assert lo == pytest.approx(2 - half, rel=1e-6) and hi == pytest.approx(2 + half, rel=1e-6)
    m1, lo1, hi1, n1 = mean_ci95([5.0])
    assert m1 == 5.0 and n1 == 1 and math.isnan(lo1) and math.isnan(hi1)


def test_paired_difference_hand_values():
    # d = [0.5, 1, 1]: mean 5/6, sd sqrt(1/12); t = mean / (sd / sqrt 3), p from t with 2 df.
    diff = paired_difference([1.0, 2.0, 3.0], [0.5, 1.0, 2.0])
    sd = math.sqrt(1 / 12)
    half = T975[2] * sd / math.sqrt(3)
    assert diff.method == "paired" and diff.df == 2 and (diff.n_a, diff.n_b) == (3, 3)
    assert diff.mean == pytest.approx(5 / 6)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(5 / 6 - half), pytest.approx(5 / 6 + half))
    t = (5 / 6) / (sd / math.sqrt(3))
    # Two-sided p of Student's t with 2 df has a closed form: 1 - t / sqrt(t^2 + 2).
    assert diff.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert diff.effect_size == pytest.approx((5 / 6) / sd)


def test_welch_difference_hand_values():
    # Equal variances (1 each), n = 3 each: Welch df = 4, se = sqrt(2/3), d = 3 / 1.
    diff = welch_difference([1.0, 2.0, 3.0], [-2.0, -1.0, 0.0])
    half = T975[4] * math.sqrt(2 / 3)
    assert diff.method == "welch" and diff.df == pytest.approx(4.0)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert diff.effect_size == pytest.approx(3.0)
    # One side constant: df falls to n - 1 of the other side.
    assert welch_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]).df == pytest.approx(2.0)


def test_single_seed_and_no_spread():
    one = paired_difference([1.0], [0.0])
    assert one.method == "single-seed" and math.isnan(one.p_value) and math.isnan(one.ci_low)
    # The same difference at every seed: the interval is that point and the difference is real.
    constant = paired_difference([1.0, 2.0, 3.0], [0.9, 1.9, 2.9])
    assert constant.ci_low == constant.ci_high == pytest.approx(0.1) and constant.p_value == 0.0
    nothing = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert nothing.mean == 0.0 and nothing.p_value == 1.0


def test_benjamini_hochberg_hand_values_and_nan_are_not_tests():
    p = [0.01, 0.04, 0.03, 0.20, math.nan]
    # sorted 0.01, 0.03, 0.04, 0.20 over m = 4: 0.04, 0.053, 0.053, 0.20 (step-up minimum).
    adjusted = adjust_pvalues(p)
    assert adjusted[:4] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20])
    assert math.isnan(adjusted[4])
    # With the NaN counted as a test the family would be 5 and 0.01 would become 0.05.
    assert adjust_pvalues([0.01])[0] == pytest.approx(0.01)


def _summaries(values: dict[str, dict[int, list[float]]], seeds: dict[str, list[int]]) -> pd.DataFrame:
    """values[variant][layer] = per-seed means (metric mean_cosine, stage trained)."""
    rows = []
    for variant, layers in values.items():
        for layer, per_seed in layers.items():
            for seed, value in zip(seeds[variant], per_seed):
                rows.append(dict(variant=variant, seed=seed, stage="trained", step=100, layer=layer,
                                 layer_name=f"L{layer}", metric="mean_cosine", mean=value, std=0.1, n_prompts=4))
    return pd.DataFrame(rows)


def test_difference_table_columns_pairing_and_correction():
    rng = np.random.default_rng(0)
    n_layers = 20
    # Layer 0 differs clearly; the other 19 layers are noise around zero.
    a = {layer: list(rng.normal(0.0, 0.05, 3)) for layer in range(n_layers)}
    b = {layer: list(np.asarray(a[layer]) + rng.normal(0.0, 0.05, 3)) for layer in range(n_layers)}
    b[0] = list(np.asarray(a[0]) - 0.5 + rng.normal(0.0, 0.01, 3))
    table = compute_differences(_summaries({"A": a, "B": b}, {"A": [0, 1, 2], "B": [0, 1, 2]}),
                                [("A", "B")], ["mean_cosine"])
    assert list(table.columns) == DIFFERENCE_COLUMNS
    assert set(table["method"]) == {"paired"} and (table["n_seeds"] == 3).all()
    assert (table["n_tests"] == n_layers).all() and set(table["correction"]) == {"Benjamini-Hochberg"}
    expected = adjust_pvalues(table["p_value"].to_numpy())
    assert table["p_adjusted"].to_numpy() == pytest.approx(expected)
    assert table["significant"].tolist() == list(expected < 0.05)
    assert bool(table.set_index("layer").loc[0, "significant"])
    # Corrected significance is stricter than the raw p-value: never more flags than raw p < 0.05.
    assert table["significant"].sum() <= (table["p_value"] < 0.05).sum()
    row = table.set_index("layer").loc[0]
    d = np.asarray(a[0]) - np.asarray(b[0])
    assert row["mean_diff"] == pytest.approx(d.mean())
    assert row["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))


def test_difference_table_welch_when_seeds_differ_and_missing_variant():
    a = {0: [1.0, 2.0, 3.0]}
    b = {0: [-2.0, -1.0, 0.0]}
    table = compute_differences(_summaries({"A": a, "B": b}, {"A": [0, 1, 2], "B": [5, 6, 7]}),
                                [("A", "B"), ("A", "ghost")], ["mean_cosine"])
    ab = table[table["comparison"] == "A - B"].iloc[0]
    assert ab["method"] == "welch" and ab["df"] == pytest.approx(4.0) and ab["n_tests"] == 1
    ghost = table[table["comparison"] == "A - ghost"]
    assert set(ghost["missing"]) == {"ghost"} and ghost["layer"].isna().all() and not ghost["significant"].any()


def test_difference_table_single_seed_has_no_tests():
    table = compute_differences(_summaries({"A": {0: [1.0], 1: [2.0]}, "B": {0: [0.0], 1: [0.0]}},
                                           {"A": [0], "B": [0]}), [("A", "B")], ["mean_cosine"])
    assert set(table["method"]) == {"single-seed"} and (table["n_tests"] == 0).all()
    assert table["p_value"].isna().all() and table["ci_low"].isna().all() and not table["significant"].any()
