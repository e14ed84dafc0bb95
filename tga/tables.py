"""The vocabulary of the long result tables (geometry ``summary.csv`` and ``metrics.csv``).

Both the comparison tables (:mod:`tga.compare`) and the figures read these tables, so
the few helpers that say how their rows are keyed live here, beside neither: a table
rule then never depends on figure code, and a figure never on the A − B statistics.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

#: The two stages of a per-model geometry table: the model at initialization and trained.
STAGES: tuple[str, str] = ("init", "trained")


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key along training: init < step{N} (by N) < trained."""
    if stage == "init":
        return (0, 0)
    if stage == "trained":
        return (2, 0)
    m = re.fullmatch(r"step(\d+)", str(stage))
    return (1, int(m[1])) if m else (1, 10**12)


def layer_names(df: pd.DataFrame) -> dict[int, str]:
    """layer index -> layer_name (first seen); the x axis is the layer index."""
    if df.empty:
        return {}
    pairs = df[["layer", "layer_name"]].dropna().drop_duplicates("layer").sort_values("layer")
    return {int(l): str(n) for l, n in zip(pairs["layer"], pairs["layer_name"])}


def per_seed_means(summaries: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One row per (variant, seed, stage, metric, layer) with that seed's prompt-mean."""
    df = summaries if metric is None else summaries[summaries["metric"] == metric]
    keys = ["variant", "seed", "stage", "metric", "layer"]
    agg = {"mean": ("mean", "mean"), "std": ("std", "mean"), "layer_name": ("layer_name", "first")}
    if "n_prompts" in df.columns:
        agg["n_prompts"] = ("n_prompts", "min")
    return df.groupby(keys, as_index=False, sort=True).agg(**agg)


def load_summaries(summary_paths: Sequence[str | Path], labels: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Every model's geometry summary in one frame, tagged with its variant and seed."""
    if len(summary_paths) != len(labels):
        raise ValueError(f"{len(summary_paths)} summaries but {len(labels)} labels")
    frames = []
    for path, label in zip(summary_paths, labels):
        frame = pd.read_csv(path)
        frame["variant"] = label["variant"]
        frame["seed"] = int(label["seed"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def format_seed_values(values: Mapping[int, float]) -> str:
    """``{seed: value}`` as one table cell, ``"0:0.125;1:0.25"``: the per-seed differences
    behind a row of ``difference.csv``, written exactly (``repr``) so figures draw the
    seeds themselves and not a rounded copy. No values give the empty string."""
    return ";".join(f"{int(seed)}:{float(value)!r}" for seed, value in sorted(values.items()))


def parse_seed_values(cell: object) -> dict[int, float]:
    """The inverse of :func:`format_seed_values`; an empty or missing cell (NaN after a
    CSV round trip) is no values."""
    if not isinstance(cell, str) or not cell.strip():
        return {}
    values: dict[int, float] = {}
    for item in cell.split(";"):
        seed, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"per-seed values {cell!r}: expected 'seed:value' items separated by ';'")
        values[int(seed)] = float(value)
    return values


def text_column(df: pd.DataFrame, column: str) -> pd.Series:
    """A text column of a result table as strings: '' where the column is absent or a
    cell is empty (a CSV round trip reads an all-empty column back as float NaN)."""
    if column not in df.columns:
        return pd.Series("", index=df.index, dtype=object)
    return df[column].map(lambda value: "" if pd.isna(value) else str(value)).astype(object)
