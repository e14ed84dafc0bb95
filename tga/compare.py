"""Gathering every model's results into comparison tables.

The data work lives here (the perplexity table, A − B differences with their
intervals, tests and corrected significance); :mod:`tga.figures_compare` only draws
what these tables say, and nothing here imports figure code, so editing a figure never
reruns a table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tga.atomic import atomic_write
from tga.stats import ALPHA, CORRECTION, adjust_pvalues, paired_difference, welch_difference
from tga.tables import STAGES, layer_names, load_summaries, per_seed_means, stage_order

COMPARISON_SEP = " - "
DIFFERENCE_COLUMNS = [
    "comparison", "a", "b", "stage", "metric", "layer", "layer_name",
    "mean_diff", "ci_low", "ci_high", "n_seeds", "p_value", "p_adjusted", "significant", "effect_size",
    "correction", "n_tests", "method", "n_a", "n_b", "df", "missing",
]

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
) -> pd.DataFrame:
    """A − B per layer for every comparison, as ``difference.csv``; a variant with no
    trained model (diverged or absent) gets rows marked missing, so its figure says so."""
    summaries = load_summaries(summary_paths, labels)
    metrics = sorted(summaries["metric"].unique())
    differences = compute_differences(summaries, [tuple(pair) for pair in comparisons], metrics)
    _atomic_csv(differences, out_csv)
    return differences


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
                        metrics: Sequence[str]) -> pd.DataFrame:
    """Per comparison (A, B), stage, metric and layer: A − B across seeds, with its 95%
    interval, t-test p-value, Benjamini–Hochberg adjusted p-value and effect size.

    When A and B were trained with the same seeds the difference is paired by seed (a
    seed fixes the data order for every variant, so pairing removes that shared noise);
    otherwise Welch's unpaired test. One family of tests is every layer × metric of one
    comparison at one stage; ``n_tests`` says how many tests it held, ``significant``
    is ``p_adjusted < 0.05``. A single seed gives no interval, no p-value and never a
    significant flag. A comparison whose variant has no data yields one row per (stage,
    metric) with ``layer`` NA and ``missing`` set, so figures can say so.
    """
    metrics = list(metrics)
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
            if paired:
                common = sorted(set(sa) & set(sb))
                diff = paired_difference([sa[k] for k in common], [sb[k] for k in common])
            else:
                diff = welch_difference(list(sa.values()), list(sb.values()))
            rows.append(dict(comparison=comparison, a=a, b=b, stage=stage, metric=metric, layer=int(layer),
                             layer_name=names.get(int(layer), str(layer)), mean_diff=diff.mean,
                             ci_low=diff.ci_low, ci_high=diff.ci_high, n_seeds=min(diff.n_a, diff.n_b),
                             p_value=diff.p_value, effect_size=diff.effect_size, method=diff.method,
                             n_a=diff.n_a, n_b=diff.n_b, df=diff.df, missing=""))
    out = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    for column in ("mean_diff", "ci_low", "ci_high", "p_value", "p_adjusted", "effect_size", "df"):
        out[column] = out[column].astype(float)
    out["correction"] = CORRECTION
    out["n_tests"] = 0
    for _, family in out.groupby(["comparison", "stage"], sort=False):
        out.loc[family.index, "p_adjusted"] = adjust_pvalues(family["p_value"].to_numpy())
        out.loc[family.index, "n_tests"] = int(np.isfinite(family["p_value"].to_numpy(float)).sum())
    out["significant"] = (out["p_adjusted"] < ALPHA).fillna(False).astype(bool)
    out["layer"] = out["layer"].astype("Int64")
    out["n_tests"] = out["n_tests"].astype(int)
    return out
