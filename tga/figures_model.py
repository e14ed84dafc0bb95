"""Figures of one model: geometry across layers, similarity heatmaps, training curves.

Each takes one model's files (geometry ``summary.csv``, ``similarity.npz``,
``train_log.csv``), init against trained; the styling comes from :mod:`tga.figure_style`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tga.figure_style import (
    BAND_ALPHA,
    COSINE_CMAP,
    STAGE_STYLE,
    esc,
    fmt_range,
    heatmap_panel,
    load_similarity,
    maybe_log_y,
    metric_label,
    metric_short,
    new_figure,
    no_data,
    save,
    setup_layer_axis,
    figure_title,
    stage_step,
    token_ticks,
)
from tga.tables import STAGES, layer_names

__all__ = ["plot_geometry_layers", "plot_similarity_heatmaps", "plot_training_curves"]


def _prompt_band_label(df: pd.DataFrame) -> str:
    n = fmt_range(df["n_prompts"]) if "n_prompts" in df.columns else "?"
    return f"shaded: ±1 s.d. across {n} prompts"


def _figure_geometry_layers(summary: pd.DataFrame, title: str, data_label: str,
                            metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    fig = new_figure(4.2 * len(metrics), 4.0)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    legend_done = False
    for ax, metric in zip(axes, metrics):
        sub = summary[(summary["metric"] == metric) & summary["stage"].isin(STAGES)]
        ax.set_title(metric_short(metric), fontsize=10)
        if sub.empty:
            no_data(ax, f"no data for {metric}")
            continue
        for stage in STAGES:
            s = sub[sub["stage"] == stage].sort_values("layer")
            if s.empty:
                continue
            x = s["layer"].to_numpy(dtype=float)
            m = s["mean"].to_numpy(dtype=float)
            sd = s["std"].to_numpy(dtype=float)
            style = STAGE_STYLE[stage]
            ax.plot(x, m, marker="o", ms=3, label=stage_step(summary, stage), **style)
            ax.fill_between(x, m - sd, m + sd, color=style["color"], alpha=BAND_ALPHA, linewidth=0)
        setup_layer_axis(ax, layer_names(sub))
        lo_hi = np.concatenate([(sub["mean"] - sub["std"]).to_numpy(float), sub["mean"].to_numpy(float)])
        ax.set_ylabel(maybe_log_y(ax, lo_hi, metric_label(metric)) if "norm" in metric
                      else metric_label(metric))
        ax.grid(alpha=0.3)
        if not legend_done:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Patch(color="0.6", alpha=0.5))
            labels.append(_prompt_band_label(sub))
            ax.legend(handles, labels, fontsize=8)
            legend_done = True
    figure_title(fig, title, data_label)
    return fig


def plot_geometry_layers(summary: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                         metrics: Sequence[str] = ("mean_cosine", "token_norm", "update_norm")) -> Path:
    """One model's per-layer geometry, init vs trained, so the effect of training is visible per depth.

    ``summary`` is a geometry ``summary.csv`` (stage,step,layer,layer_name,metric,mean,std,n_prompts).
    Bands are ±1 s.d. across prompts. A metric absent from the data gets a 'no data' panel.
    """
    return save(_figure_geometry_layers(summary, title, data_label, metrics), out_path)


def _figure_similarity_heatmaps(npz_path: Path | str, title: str, data_label: str, prompt: int,
                                max_tick_labels: int, names: dict[int, str] | None) -> Figure:
    stored, tokens, stored_names = load_similarity(npz_path, prompt)
    mats = {key: mat for key, mat in stored.items() if key[0] in STAGES}
    if not mats:
        raise ValueError(f"{npz_path}: no init/trained similarity matrices for prompt {prompt}")
    names = stored_names if names is None else names
    stages = [s for s in STAGES if any(k[0] == s for k in mats)]
    layers = sorted({k[1] for k in mats})
    n_tokens = next(iter(mats.values())).shape[0]
    ticks = token_ticks(n_tokens, tokens, max_tick_labels)

    fig = new_figure(2.5 * len(layers) + 1.2, 2.6 * len(stages) + 1.0)
    axes = fig.subplots(len(stages), len(layers), squeeze=False)
    mesh = None
    for r, stage in enumerate(stages):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            ax.set_title(f"{stage}: {esc(names.get(layer, f'layer {layer}'))}", fontsize=9)
            mat = mats.get((stage, layer))
            if mat is None:
                no_data(ax, "not stored")
                continue
            mesh = heatmap_panel(ax, mat, COSINE_CMAP, 1.0, ticks, bottom=r == len(stages) - 1, left=c == 0)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, shrink=0.8, label="cosine similarity (unitless)")
    fig.suptitle(f"{esc(title)}\n{esc(data_label)}\npairwise token cosine similarity, prompt {prompt} "
                 f"({n_tokens} tokens), colour range fixed to [−1, 1]", fontsize=10)
    return fig


def plot_similarity_heatmaps(npz_path: Path | str, out_path: Path | str, title: str, data_label: str,
                             prompt: int = 0, max_tick_labels: int = 40,
                             layer_names: dict[int, str] | None = None) -> Path:
    """Token×token cosine matrices per stored layer (rows init/trained) for one prompt.

    The colour range is fixed to [−1, 1] so panels are comparable by eye. ``layer_names``
    (layer index -> name) titles the columns; by default the npz's ``layer_names`` entry
    (written by the geometry step) is used, else they read 'layer j'.
    """
    fig = _figure_similarity_heatmaps(npz_path, title, data_label, prompt, max_tick_labels, layer_names)
    return save(fig, out_path)


def _figure_training_curves(log: pd.DataFrame, title: str, data_label: str) -> Figure:
    log = log.sort_values("step")
    fig = new_figure(13.0, 4.0)
    ax_loss, ax_ppl, ax_lr = fig.subplots(1, 3)

    tr = log[["step", "train_loss"]].dropna()
    va = log[["step", "val_loss", "val_ppl"]].dropna(subset=["val_loss"])
    ax_loss.plot(tr["step"], tr["train_loss"], color="tab:blue", lw=1, label="train loss (batch)")
    ax_loss.plot(va["step"], va["val_loss"], color="tab:red", marker="o", ms=3, label="validation loss")
    ax_loss.set(xlabel="training step", ylabel="loss (nats/token)", title="cross-entropy loss")
    ax_loss.legend(fontsize=8)

    vp = log[["step", "val_ppl"]].dropna()
    if vp.empty:
        no_data(ax_ppl, "no validation evaluations")
    else:
        ax_ppl.plot(vp["step"], vp["val_ppl"], color="tab:red", marker="o", ms=3, label="validation perplexity")
        ax_ppl.set_yscale("log")
        last = vp.iloc[-1]
        ax_ppl.annotate(f"{last['val_ppl']:.2f}", (last["step"], last["val_ppl"]), textcoords="offset points",
                        xytext=(-4, 6), ha="right", fontsize=8)
        ax_ppl.legend(fontsize=8)
    ax_ppl.set(xlabel="training step", ylabel="validation perplexity (tokens) [log scale]",
               title="validation perplexity")

    lr = log[["step", "lr"]].dropna()
    ax_lr.plot(lr["step"], lr["lr"], color="tab:green", label="learning rate")
    ax_lr.set(xlabel="training step", ylabel="learning rate (per step)", title="learning-rate schedule")
    ax_lr.legend(fontsize=8, loc="best")
    for ax in (ax_loss, ax_ppl, ax_lr):
        ax.grid(alpha=0.3)
    figure_title(fig, title, data_label)
    return fig


def plot_training_curves(log: pd.DataFrame, out_path: Path | str, title: str, data_label: str) -> Path:
    """Loss, validation perplexity and LR schedule vs step, to judge convergence and schedule sanity.

    ``log`` is ``train_log.csv``; rows without validation values are skipped only for val series.
    """
    return save(_figure_training_curves(log, title, data_label), out_path)
