"""Gathering every model's results into comparison tables.

The data work lives here (the perplexity table, A − B differences with their
intervals, tests and corrected significance); :mod:`tga.figures_compare` only draws
what these tables say, and nothing here imports figure code, so editing a figure never
reruns a table.

Some differences hold by construction, and the table says which (``construction``):

- ``norm``: the value is a norm's doing, not the stream's. A norm's output has norm
  √d at unit gain, so ``token_norm`` at any layer a norm produces (``final_norm`` in
  every model, every block's output in Post-LN) is set by that norm; the step
  metrics at ``final_norm`` (``update_norm``, ``knn_overlap``) measure what the final
  norm does to the stream, which is large for Pre-LN's unnormalized stream and nearly
  nothing for Post-LN's; and Post-LN's ``update_norm`` at ``block1`` holds its first
  norm rescaling the embedding. These rows stay tests, labelled (:func:`norm_effect`).
- ``identical``: A and B are equal, to the last bit, at every seed (e.g. every metric
  at the embedding at init: the same seed draws the same embedding in both). Such a row
  is no test: it leaves the Benjamini–Hochberg family, and its p-values are empty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from tga.atomic import atomic_write
from tga.stats import ALPHA, CORRECTION, adjust_pvalues, paired_difference, welch_difference
from tga.tables import STAGES, format_seed_values, layer_names, load_summaries, per_seed_means, stage_order

COMPARISON_SEP = " - "
DIFFERENCE_COLUMNS = [
    "comparison", "a", "b", "stage", "metric", "layer", "layer_name",
    "mean_diff", "ci_low", "ci_high", "n_seeds", "p_value", "p_adjusted", "significant", "effect_size",
    "correction", "n_tests", "tested", "construction", "construction_note", "method", "n_a", "n_b", "df",
    "missing", "seed_differences",
]

#: ``construction`` of a row whose value a norm sets (kept in the tests, labelled).
NORM_EFFECT = "norm"
#: ``construction`` of a row equal in A and B at every seed (left out of the tests).
IDENTICAL = "identical"
#: What one Benjamini–Hochberg family is, in the words the figure, findings and captions use.
FAMILY_DESCRIPTION = "the layer × metric tests of one comparison at one stage"
#: Metrics that compare a layer with the one before it: at ``final_norm`` they measure the norm's step.
STEP_METRICS: tuple[str, ...] = ("update_norm", "knn_overlap")
NORM_NAMES = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}

PERPLEXITY_COLUMNS = [
    "variant", "seed", "status", "split", "tokenizer", "token_ppl", "bits_per_byte", "word_ppl", "loss_nats",
    "n_tokens_scored", "n_bytes", "n_words", "block_size",
]


def _atomic_csv(frame: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_perplexity_table(
    json_paths: Sequence[str | Path], out_csv: str | Path, diverged: Sequence[dict[str, Any]] = ()
) -> pd.DataFrame:
    """One row per model; runs whose training diverged get a row that says so (and
    empty metrics) rather than silently vanishing from the comparison."""
    rows = [{**json.loads(Path(p).read_text()), "status": "ok"} for p in json_paths]
    rows += [{"variant": d["variant"], "seed": d["seed"], "status": f"diverged at step {d['step']}"}
             for d in diverged]
    frame = pd.DataFrame(rows)
    frame = frame[[c for c in PERPLEXITY_COLUMNS if c in frame.columns]]
    _atomic_csv(frame, out_csv)
    return frame


def write_differences(
    summary_paths: Sequence[str | Path],
    labels: Sequence[dict[str, Any]],
    comparisons: Sequence[Sequence[str]],
    out_csv: str | Path,
    architectures: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """A − B per layer for every comparison, as ``difference.csv``; a variant with no
    trained model (diverged or absent) gets rows marked missing, so its figure says so.
    ``architectures``: variant -> its model settings (``norm_position``, ``norm``), which
    say where a norm sets a value (:func:`norm_effect`)."""
    summaries = load_summaries(summary_paths, labels)
    metrics = sorted(summaries["metric"].unique())
    differences = compute_differences(summaries, [tuple(pair) for pair in comparisons], metrics, architectures)
    _atomic_csv(differences, out_csv)
    return differences


def norm_effect(metric: str, layer_name: str, architecture: Mapping[str, Any] | None) -> str:
    """Why a norm sets this metric at this layer of a model built as ``architecture``
    (``norm_position``, ``norm``), or "" when it does not. A model whose architecture is
    not known (a pretrained entry) gets "": where its norms sit is not known here.

    A norm's output has norm √d at unit gain, so ``token_norm`` is the norm's wherever a
    norm produces the layer: ``final_norm``, and in Post-LN every block. The step metrics
    at ``final_norm`` (``update_norm``, ``knn_overlap``) compare the stream before and
    after the final norm, which is all that layer does. Post-LN's first block normalizes
    the (small, unnormalized) embedding, so its ``update_norm`` holds that rescaling. Every
    other metric at ``final_norm`` is the last block's stream seen through the final norm's
    gain (and LayerNorm's centring): labelled too, so a difference there is not read as
    the stream's."""
    if not architecture:
        return ""
    norm = NORM_NAMES.get(str(architecture.get("norm")), "norm")
    post = architecture.get("norm_position") == "post"
    if metric == "token_norm" and layer_name == "final_norm":
        return f"token_norm is the final {norm}'s output norm (√d at unit gain)"
    if metric == "token_norm" and post and layer_name.startswith("block"):
        return f"token_norm is the Post-LN block's {norm} output norm (√d at unit gain)"
    if metric in STEP_METRICS and layer_name == "final_norm":
        return f"{metric} at final_norm measures the final {norm}'s own step (its rescaling of the stream)"
    if metric == "update_norm" and post and layer_name == "block1":
        return f"update_norm at block1 includes the Post-LN {norm} rescaling the unnormalized embedding to √d"
    if layer_name == "final_norm":
        return (f"{metric} at final_norm is read after the final {norm}, whose gain reweights the channels"
                + (" and whose centring removes the mean" if norm == "LayerNorm" else "")
                + "; the last block shows the stream itself")
    return ""


def _norm_note(a: str, b: str, reason_a: str, reason_b: str) -> str:
    """One row's note naming which side(s) a norm sets."""
    if reason_a and reason_a == reason_b:
        return f"in A and B, {reason_a}"
    return "; ".join(f"in {side} ({name}), {reason}" for side, name, reason in (("A", a, reason_a), ("B", b, reason_b))
                     if reason)


def _identical_note(stage: str, layer_name: str, n_seeds: int) -> str:
    """Why an identical row is no test; at the embedding at init the cause is known."""
    note = f"A and B are identical at all {n_seeds} seeds (to the last bit): equal by construction, not tested"
    if stage == "init" and layer_name == "embedding":
        note += "; at init the same seed draws the same embedding in both, and they differ only from block 1 on"
    return note


def _seed_values(per_seed: pd.DataFrame) -> dict[tuple[str, str, int], dict[int, float]]:
    """(stage, metric, layer) -> {seed: finite per-seed mean}; plain dicts keep this fast."""
    cells: dict[tuple[str, str, int], dict[int, float]] = {}
    cols = zip(per_seed["stage"], per_seed["metric"], per_seed["layer"], per_seed["seed"], per_seed["mean"])
    for stage, metric, layer, seed, value in cols:
        cell = cells.setdefault((str(stage), str(metric), int(layer)), {})
        if np.isfinite(value):
            cell[int(seed)] = float(value)
    return cells


def compute_differences(summaries: pd.DataFrame, comparisons: Sequence[tuple[str, str]],
                        metrics: Sequence[str],
                        architectures: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Per comparison (A, B), stage, metric and layer: A − B across seeds, with its 95%
    interval, t-test p-value, Benjamini–Hochberg adjusted p-value and effect size.

    When A and B were trained with the same seeds the difference is paired by seed (a
    seed fixes the data order for every variant, so pairing removes that shared noise),
    and ``seed_differences`` keeps each seed's A − B; otherwise Welch's unpaired test.
    One family of tests is every layer × metric of one comparison at one stage, less the
    rows identical in A and B at every seed (``construction`` = ``identical``: no test,
    p-values empty); ``n_tests`` says how many tests the family held, ``tested`` whether
    this row was one, ``significant`` is ``p_adjusted < 0.05``. Rows whose value a norm
    sets (``architectures``, :func:`norm_effect`) stay tests and are labelled ``norm``;
    ``construction_note`` says why. A single seed gives no interval, no p-value and never
    a significant flag. A comparison whose variant has no data yields one row per (stage,
    metric) with ``layer`` NA and ``missing`` set, so figures can say so.
    """
    metrics = list(metrics)
    architectures = architectures or {}
    needed = {"variant", "seed", "stage", "metric", "layer", "layer_name", "mean"}
    if needed.issubset(summaries.columns):
        per_seed = per_seed_means(summaries[summaries["metric"].isin(metrics)])
    else:
        per_seed = pd.DataFrame(columns=sorted(needed | {"std"}))
    present = set(per_seed["variant"].unique())
    all_stages = sorted(per_seed["stage"].unique(), key=stage_order) or list(STAGES)
    rows: list[dict[str, Any]] = []
    for a, b in comparisons:
        comparison = f"{a}{COMPARISON_SEP}{b}"
        missing = [v for v in (a, b) if v not in present]
        if missing:
            rows += [dict(comparison=comparison, a=a, b=b, stage=stage, metric=metric, layer=pd.NA, layer_name="",
                          n_seeds=0, significant=False, method="missing", n_a=0, n_b=0, missing=", ".join(missing))
                     for stage in all_stages for metric in metrics]
            continue
        pa, pb = per_seed[per_seed["variant"] == a], per_seed[per_seed["variant"] == b]
        paired = set(pa["seed"]) == set(pb["seed"])
        values_a, values_b = _seed_values(pa), _seed_values(pb)
        names = {**layer_names(pb), **layer_names(pa)}
        cells = sorted(set(values_a) | set(values_b), key=lambda k: (stage_order(k[0]), metrics.index(k[1]), k[2]))
        for stage, metric, layer in cells:
            sa, sb = values_a.get((stage, metric, layer), {}), values_b.get((stage, metric, layer), {})
            name = names.get(int(layer), str(layer))
            construction, note, per_seed_diff = "", "", {}
            if paired:
                common = sorted(set(sa) & set(sb))
                diff = paired_difference([sa[k] for k in common], [sb[k] for k in common])
                per_seed_diff = {k: sa[k] - sb[k] for k in common}
                if common and set(sa) == set(sb) and all(sa[k] == sb[k] for k in common):
                    construction, note = IDENTICAL, _identical_note(stage, name, len(common))
            else:
                diff = welch_difference(list(sa.values()), list(sb.values()))
            if not construction:
                reason_a = norm_effect(metric, name, architectures.get(a))
                reason_b = norm_effect(metric, name, architectures.get(b))
                if reason_a or reason_b:
                    construction, note = NORM_EFFECT, _norm_note(a, b, reason_a, reason_b)
            p_value = math.nan if construction == IDENTICAL else diff.p_value
            rows.append(dict(comparison=comparison, a=a, b=b, stage=stage, metric=metric, layer=int(layer),
                             layer_name=name, mean_diff=diff.mean,
                             ci_low=diff.ci_low, ci_high=diff.ci_high, n_seeds=min(diff.n_a, diff.n_b),
                             p_value=p_value, effect_size=diff.effect_size, method=diff.method,
                             n_a=diff.n_a, n_b=diff.n_b, df=diff.df, missing="", construction=construction,
                             construction_note=note, seed_differences=format_seed_values(per_seed_diff)))
    out = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    for column in ("mean_diff", "ci_low", "ci_high", "p_value", "p_adjusted", "effect_size", "df"):
        out[column] = out[column].astype(float)
    for column in ("construction", "construction_note", "seed_differences", "missing"):
        out[column] = out[column].fillna("").astype(str)
    out["correction"] = CORRECTION
    out["tested"] = np.isfinite(out["p_value"].to_numpy(float))
    out["n_tests"] = 0
    for _, family in out.groupby(["comparison", "stage"], sort=False):
        out.loc[family.index, "p_adjusted"] = adjust_pvalues(family["p_value"].to_numpy())
        out.loc[family.index, "n_tests"] = int(family["tested"].sum())
    out["significant"] = (out["p_adjusted"] < ALPHA).fillna(False).astype(bool)
    out["layer"] = out["layer"].astype("Int64")
    out["n_tests"] = out["n_tests"].astype(int)
    return out
