"""Statistics across seeds: intervals and tests against hand computations, the
Benjamini–Hochberg correction, and the difference table the figures draw from."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tga.compare import DIFFERENCE_COLUMNS, IDENTICAL, NORM_EFFECT, compute_differences, norm_effect
from tga.stats import (
    CORRECTION,
    CORRECTION_NAME,
    CORRECTION_TEXT,
    adjust_pvalues,
    mean_ci95,
    paired_difference,
    welch_difference,
)
from tga.tables import format_seed_values, parse_seed_values

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


def _summaries(values: dict[str, dict[int, list[float]]], seeds: dict[str, list[int]],
               metric: str = "mean_cosine", stage: str = "trained",
               names: dict[int, str] | None = None) -> pd.DataFrame:
    """values[variant][layer] = per-seed means (of ``metric`` at ``stage``)."""
    rows = []
    for variant, layers in values.items():
        for layer, per_seed in layers.items():
            for seed, value in zip(seeds[variant], per_seed):
                rows.append(dict(variant=variant, seed=seed, stage=stage, step=100, layer=layer,
                                 layer_name=(names or {}).get(layer, f"L{layer}"), metric=metric, mean=value,
                                 std=0.1, n_prompts=4))
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


def test_correction_words_name_the_correction_the_table_uses():
    assert CORRECTION_NAME.replace("–", "-") == CORRECTION
    assert CORRECTION_TEXT == "Benjamini–Hochberg (FDR 5%)"


def test_seed_values_round_trip_exactly():
    values = {2: 0.1 + 0.2, 0: -1e-300, 1: 7.0}
    assert parse_seed_values(format_seed_values(values)) == values
    assert parse_seed_values(float("nan")) == {} and format_seed_values({}) == ""
    with pytest.raises(ValueError, match="seed:value"):
        parse_seed_values("0=1.0")


SEEDS3 = {"A": [0, 1, 2], "B": [0, 1, 2]}


def _identical_at_layer0(rng: np.random.Generator, n_layers: int = 6) -> pd.DataFrame:
    """Layer 0 identical in A and B at every seed (as the embedding at init); layer 1
    clearly different; the rest noise."""
    a = {layer: list(rng.normal(0.0, 0.05, 3)) for layer in range(n_layers)}
    b = {layer: list(np.asarray(a[layer]) + rng.normal(0.0, 0.05, 3)) for layer in range(n_layers)}
    b[0] = list(a[0])
    b[1] = list(np.asarray(a[1]) - 0.5 + rng.normal(0.0, 0.01, 3))
    return _summaries({"A": a, "B": b}, SEEDS3, stage="init", names={0: "embedding"})


def test_identical_rows_leave_the_family_and_say_why():
    table = compute_differences(_identical_at_layer0(np.random.default_rng(1)), [("A", "B")], ["mean_cosine"])
    same = table.set_index("layer").loc[0]
    assert same["construction"] == IDENTICAL and not same["tested"] and not same["significant"]
    assert math.isnan(same["p_value"]) and math.isnan(same["p_adjusted"]) and same["mean_diff"] == 0.0
    assert "identical at all 3 seeds" in same["construction_note"]
    assert "same embedding" in same["construction_note"]  # the embedding at init: the cause is named
    tested = table[table["layer"] != 0]
    assert tested["tested"].all() and (table["n_tests"] == 5).all()
    # BH over the five tests only: the identical row's p = 1 would have made the family six.
    assert tested["p_adjusted"].to_numpy() == pytest.approx(adjust_pvalues(tested["p_value"].to_numpy()))
    with_identical = adjust_pvalues(np.append(tested["p_value"].to_numpy(), 1.0))[:-1]
    assert not np.allclose(tested["p_adjusted"].to_numpy(), with_identical)


def test_equal_at_some_seeds_only_is_a_test():
    summaries = _identical_at_layer0(np.random.default_rng(2))
    seed2 = (summaries["variant"] == "B") & (summaries["layer"] == 0) & (summaries["seed"] == 2)
    summaries.loc[seed2, "mean"] += 1e-9
    row = compute_differences(summaries, [("A", "B")], ["mean_cosine"]).set_index("layer").loc[0]
    assert row["construction"] == "" and row["tested"] and np.isfinite(row["p_value"])


def test_identical_rows_need_paired_seeds():
    summaries = _identical_at_layer0(np.random.default_rng(3))
    summaries.loc[summaries["variant"] == "B", "seed"] += 10  # same values, other seeds: unpaired
    row = compute_differences(summaries, [("A", "B")], ["mean_cosine"]).set_index("layer").loc[0]
    assert row["method"] == "welch" and row["construction"] == "" and row["tested"]


PRE = {"norm_position": "pre", "norm": "rmsnorm"}
POST = {"norm_position": "post", "norm": "rmsnorm"}
NAMES = {0: "embedding", 1: "block1", 2: "block2", 3: "final_norm"}


def test_norm_effect_follows_the_architecture():
    assert norm_effect("token_norm", "block2", POST) and not norm_effect("token_norm", "block2", PRE)
    assert norm_effect("token_norm", "final_norm", PRE) and norm_effect("token_norm", "final_norm", POST)
    assert not norm_effect("token_norm", "embedding", POST)
    for metric in ("update_norm", "knn_overlap"):
        assert norm_effect(metric, "final_norm", PRE) and not norm_effect(metric, "block2", PRE)
    assert norm_effect("update_norm", "block1", POST) and not norm_effect("update_norm", "block2", POST)
    assert not norm_effect("update_norm", "block1", PRE)
    # Every metric at final_norm is read through the final norm's gain (issue 21 item 4),
    # elsewhere a cosine is the stream's own.
    assert "gain" in norm_effect("mean_cosine", "final_norm", PRE) and not norm_effect("mean_cosine", "block2", POST)
    assert "centring" in norm_effect("effective_rank", "final_norm", {"norm_position": "post", "norm": "layernorm"})
    assert "centring" not in norm_effect("effective_rank", "final_norm", PRE)
    assert "LayerNorm" in norm_effect("token_norm", "final_norm", {"norm_position": "pre", "norm": "layernorm"})
    assert norm_effect("token_norm", "final_norm", None) == ""  # a pretrained entry: not known


def test_norm_rows_are_labelled_and_stay_tests():
    rng = np.random.default_rng(4)
    pre = {layer: list(rng.normal(3.0 * layer, 0.1, 3)) for layer in NAMES}
    post = {layer: list(rng.normal(5.66, 0.01, 3)) for layer in NAMES}
    summaries = _summaries({"pre": pre, "post": post}, {"pre": [0, 1, 2], "post": [0, 1, 2]}, metric="token_norm",
                           names=NAMES)
    table = compute_differences(summaries, [("pre", "post")], ["token_norm"], {"pre": PRE, "post": POST})
    rows = table.set_index("layer_name")
    assert rows.loc["embedding", "construction"] == ""
    assert (rows.loc[["block1", "block2", "final_norm"], "construction"] == NORM_EFFECT).all()
    assert rows.loc["block1", "construction_note"].startswith("in B (post), token_norm is the Post-LN block's")
    assert rows.loc["final_norm", "construction_note"].startswith("in A and B,")
    assert table["tested"].all() and (table["n_tests"] == 4).all()
    # Without the architectures nothing is labelled: the labels come from them, not the values.
    plain = compute_differences(summaries, [("pre", "post")], ["token_norm"])
    assert (plain["construction"] == "").all()
    assert plain["p_adjusted"].to_numpy() == pytest.approx(table["p_adjusted"].to_numpy())


def test_seed_differences_are_the_paired_differences():
    rng = np.random.default_rng(5)
    a = {0: list(rng.normal(0, 1, 3))}
    b = {0: list(rng.normal(0, 1, 3))}
    row = compute_differences(_summaries({"A": a, "B": b}, SEEDS3), [("A", "B")], ["mean_cosine"]).iloc[0]
    per_seed = parse_seed_values(row["seed_differences"])
    assert per_seed == {s: a[0][i] - b[0][i] for i, s in enumerate(SEEDS3["A"])}
    assert np.mean(list(per_seed.values())) == pytest.approx(row["mean_diff"])
    unpaired = _summaries({"A": a, "B": b}, {"A": [0, 1, 2], "B": [3, 4, 5]})
    assert compute_differences(unpaired, [("A", "B")], ["mean_cosine"]).iloc[0]["seed_differences"] == ""


def test_extra_summary_columns_change_nothing():
    """Columns other than the keys and ``mean`` (e.g. a TwoNN floor or a null) are not metrics."""
    summaries = _identical_at_layer0(np.random.default_rng(6))
    extra = summaries.assign(twonn_floor=1.5, null_mean=np.nan, null_sd="x")
    before = compute_differences(summaries, [("A", "B")], ["mean_cosine"])
    after = compute_differences(extra, [("A", "B")], ["mean_cosine"])
    pd.testing.assert_frame_equal(before, after)
