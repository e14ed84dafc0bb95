"""Figures of one model: geometry across layers, similarity heatmaps, training curves.

Each takes one model's files (geometry ``summary.csv``, ``similarity.npz``,
``train_log.csv``), init against trained; the styling comes from :mod:`tga.figure_style`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


_FLOOR_STYLE = {"color": "tab:purple", "linestyle": ":", "lw": 1.4}
_FLOOR_LABEL = "isotropic Gaussian of the same N and d (noise floor; band: 95%)"
_YLABEL_WIDTH = 44  # characters per line: a longer label wraps instead of running into the title


def _readable_log_axis(ax: Axes) -> None:
    """Plain numbers at 1-2-5 steps on a log y axis, where matplotlib's default shows
    only the one or two powers of ten the range happens to cross."""
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_floor(ax: Axes, sub: pd.DataFrame) -> bool:
    """The Gaussian reference of a TwoNN panel (the null columns of summary.csv): its
    mean as a dotted line, its 95% band shaded; the same at every stage (same N and d),
    so it is drawn once, from the last stage that has it. False when there is none."""
    if "null_mean" not in sub.columns:
        return False
    has = sub[np.isfinite(sub["null_mean"].to_numpy(dtype=float))]
    if has.empty:
        return False
    stage = [s for s in STAGES if (has["stage"] == s).any()][-1]
    f = has[has["stage"] == stage].sort_values("layer")
    x = f["layer"].to_numpy(dtype=float)
    ax.plot(x, f["null_mean"].to_numpy(dtype=float), label=_FLOOR_LABEL, **_FLOOR_STYLE)
    ax.fill_between(x, f["null_lo"].to_numpy(dtype=float), f["null_hi"].to_numpy(dtype=float),
                    color=_FLOOR_STYLE["color"], alpha=0.1, linewidth=0)
    return True


def _geometry_panel(ax: Axes, summary: pd.DataFrame, metric: str) -> bool:
    """One metric across layers, init vs trained (±1 s.d. across prompts where the metric
    is per prompt), with its Gaussian floor where it has one. False when no data."""
    sub = summary[(summary["metric"] == metric) & summary["stage"].isin(STAGES)]
    ax.set_title(textwrap.fill(metric_short(metric), _YLABEL_WIDTH), fontsize=10)
    if sub.empty:
        no_data(ax, f"no data for {metric}")
        return False
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
    floor = _draw_floor(ax, sub)
    setup_layer_axis(ax, layer_names(sub))
    label = metric_label(metric)
    if "norm" in metric:
        lo_hi = np.concatenate([(sub["mean"] - sub["std"]).to_numpy(float), sub["mean"].to_numpy(float)])
        label = maybe_log_y(ax, lo_hi, label)
        if ax.get_yscale() == "log":
            _readable_log_axis(ax)
    elif floor:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(textwrap.fill(label, _YLABEL_WIDTH), fontsize=9)
    ax.grid(alpha=0.3)
    return True


def _figure_geometry_layers(summary: pd.DataFrame, title: str, data_label: str,
                            metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    n_cols = min(3, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    fig = new_figure(4.4 * n_cols, 4.1 * n_rows + 0.6)
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    drawn = [_geometry_panel(ax, summary, metric) for ax, metric in zip(axes, metrics)]
    handles: dict[str, object] = {}
    for ax, ok in zip(axes, drawn):
        if ok:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
    if handles:
        per_prompt = summary[summary["metric"].isin(metrics) & summary["std"].notna()]
        handles[_prompt_band_label(per_prompt if not per_prompt.empty else summary)] = Patch(color="0.6", alpha=0.5)
        spare = axes[len(metrics):]
        if spare:  # a free cell of the grid holds the legend, clear of every curve
            spare[0].legend(list(handles.values()), list(handles), loc="center", fontsize=8, frameon=False)
        else:
            axes[0].legend(list(handles.values()), list(handles), fontsize=8)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    figure_title(fig, title, data_label)
    return fig


#: The panels of geometry_layers.png: what training does to the similarity and the norms
#: at each depth, and the two TwoNN estimates with their Gaussian floors.
GEOMETRY_LAYER_METRICS: tuple[str, ...] = ("mean_cosine", "token_norm", "update_norm", "twonn", "twonn_pooled")


def plot_geometry_layers(summary: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                         metrics: Sequence[str] = GEOMETRY_LAYER_METRICS) -> Path:
    """One model's per-layer geometry, init vs trained, so the effect of training is visible per depth.

    ``summary`` is a geometry ``summary.csv`` (stage,step,layer,layer_name,metric,mean,std,n_prompts
    and the null columns). Bands are ±1 s.d. across prompts; a metric with a null reference
    (the TwoNN values) also shows it, a dotted line with its 95% band. A metric absent from
    the data gets a 'no data' panel.
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
