"""Gathering every model's results into comparison tables and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from tga.plots import compute_differences, plot_differences, plot_perplexity, plot_similarity_by_layer

PERPLEXITY_COLUMNS = [
    "variant", "seed", "status", "split", "tokenizer", "token_ppl", "bits_per_byte", "word_ppl", "loss_nats",
    "n_tokens_scored", "n_bytes", "n_words", "block_size",
]


def _atomic_csv(frame: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


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


def plot_perplexity_table(csv_path: str | Path, out_png: str | Path, data_label: str) -> None:
    plot_perplexity(pd.read_csv(csv_path), out_png, data_label)


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


def diverged_note(data_label: str, diverged: Sequence[dict[str, Any]]) -> str:
    """The figure subtitle, extended with the runs that are missing because they diverged."""
    if not diverged:
        return data_label
    runs = ", ".join(f"{d['variant']} seed {d['seed']} (step {d['step']})" for d in diverged)
    return f"{data_label}\nmissing, training diverged: {runs}"


def plot_similarity_by_layer_files(
    summary_paths: Sequence[str | Path],
    labels: Sequence[dict[str, Any]],
    out_png: str | Path,
    data_label: str,
    diverged: Sequence[dict[str, Any]] = (),
) -> None:
    plot_similarity_by_layer(load_summaries(summary_paths, labels), out_png, diverged_note(data_label, diverged))


def write_differences(
    summary_paths: Sequence[str | Path],
    labels: Sequence[dict[str, Any]],
    comparisons: Sequence[Sequence[str]],
    out_png: str | Path,
    out_csv: str | Path,
    data_label: str,
    diverged: Sequence[dict[str, Any]] = (),
) -> pd.DataFrame:
    """A − B per layer for every comparison, as a table and as a figure; a variant
    with no trained model is marked missing in its panels."""
    summaries = load_summaries(summary_paths, labels)
    metrics = sorted(summaries["metric"].unique())
    differences = compute_differences(summaries, [tuple(pair) for pair in comparisons], metrics)
    _atomic_csv(differences, out_csv)
    plot_differences(differences, out_png, diverged_note(data_label, diverged))
    return differences
