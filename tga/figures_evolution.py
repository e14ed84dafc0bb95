"""Figures of one model across training: geometry against the step (with the loss on
the same step axis), heatmaps before and after, and the per-prompt change of a metric.

Inputs are an evolution step's files (``summary.csv`` / ``metrics.csv`` with stages
``init`` and ``step{N}``, ``similarity.npz``) and ``train_log.csv``; the styling comes
from :mod:`tga.figure_style`. Matplotlib images draw the heatmaps (via
:func:`tga.figure_style.heatmap_panel`) and seaborn the before/after bands of
:func:`plot_similarity_change`, straight from the long per-prompt table.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tga.figure_style import (
    BAND_ALPHA,
    CHANGE_CMAP,
    COSINE_CMAP,
    FLOOR_LABEL,
    FLOOR_STYLE,
    HEATMAP_WORDS,
    STAGE_STYLE,
    centred_change,
    esc,
    figure_title,
    log_step_axis,
    fmt_range,
    heatmap_panel,
    load_similarity,
    maybe_log_y,
    metric_label,
    metric_short,
    new_figure,
    no_data,
    plain_log_ticks,
    save,
    setup_layer_axis,
    similarity_view,
    suptitle,
    train_loss_steps,
    wrap_to_width,
)
from tga.tables import layer_names, stage_order

__all__ = [
    "EVOLUTION_FIGURES",
    "EVOLUTION_METRICS",
    "plot_evolution_figures",
    "plot_heatmaps_before_after",
    "plot_metrics_by_step",
    "plot_similarity_change",
]

#: Metrics drawn against the training step by default: one per aspect of the geometry
#: (alignment, its anisotropy-adjusted form, the common direction, scale, update size,
#: dimension twice, neighbourhoods). Left out, as near-duplicates or single-layer: the
#: cross-prompt baseline (inside the adjusted cosine), the rank-1 residual, TwoNN's MLE
#: fit and the logit-frequency correlation; pass ``metrics=`` for any of them.
EVOLUTION_METRICS: tuple[str, ...] = (
    "mean_cosine", "adjusted_cosine", "common_direction_share", "token_norm",
    "update_norm", "effective_rank", "twonn", "knn_overlap",
)
STEP_AXIS_LABEL = "training step [log scale; 0 = initialization]"
PANEL_WIDTH = 3.6  # inches, per metric panel
_ANALYSED_STYLE = {"color": "0.55", "lw": 0.8, "linestyle": ":"}


def _stage_steps(df: pd.DataFrame) -> dict[str, int]:
    """stage -> step, ordered along training (init first)."""
    pairs = df[["stage", "step"]].drop_duplicates("stage")
    ordered = sorted(zip(pairs["stage"].astype(str), pairs["step"].astype(int)),
                     key=lambda p: (p[1], stage_order(p[0])))
    return {stage: step for stage, step in ordered}


def _max_step(*step_sets: Iterable[float]) -> float:
    """The last step drawn, so every panel of a run shares one step axis."""
    values = [float(s) for steps in step_sets for s in steps if pd.notna(s) and np.isfinite(float(s))]
    return max(values, default=1.0)


def _depth_colors(layers: Sequence[int]) -> dict[int, tuple]:
    """Viridis by depth: dark = shallow, yellow = deep."""
    cmap = matplotlib.colormaps["viridis"]
    n = max(1, len(layers) - 1)
    return {layer: cmap(0.9 * i / n) for i, layer in enumerate(sorted(layers))}


def _loss_panel(ax: Axes, log: pd.DataFrame, analysed_steps: Sequence[int]) -> None:
    log = log.sort_values("step")
    tr_steps, tr_loss = train_loss_steps(log)
    va = log[["step", "val_loss"]].dropna()
    for step in analysed_steps:
        ax.axvline(step, **_ANALYSED_STYLE)
    handles: list[object] = []
    labels: list[str] = []
    if tr_steps.size:
        (h,) = ax.plot(tr_steps, tr_loss, color="0.15", lw=1.2, drawstyle="steps-pre")
        handles.append(h)
        labels.append("train loss, mean over each log interval")
    if not va.empty:
        (h,) = ax.plot(va["step"], va["val_loss"], color="tab:red", marker="o", ms=3)
        handles.append(h)
        labels.append("validation loss")
    if not handles:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes, color="tab:red")
    if len(analysed_steps):
        handles.append(Line2D([], [], **_ANALYSED_STYLE))
        labels.append("analysed checkpoint")
    ax.legend(handles, labels, fontsize=7, loc="lower left", framealpha=0.85)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("cross-entropy loss")
    ax.grid(alpha=0.3)


def _undefined_layers(sub: pd.DataFrame, names: dict[int, str]) -> list[str]:
    finite = sub.groupby("layer")["mean"].apply(lambda v: bool(np.isfinite(v.to_numpy(float)).any()))
    return [names.get(int(layer), str(layer)) for layer, ok in finite.items() if not ok]


def _short_label(metric: str) -> str:
    """The y label: the metric's unit only (the panel title names the metric)."""
    label = metric_label(metric)
    unit = label[label.rfind("(") + 1:-1] if label.endswith(")") and "(" in label else ""
    return unit or label


def _draw_step_floor(ax: Axes, sub: pd.DataFrame) -> bool:
    """A TwoNN panel's Gaussian noise floor (summary.csv's null columns), a horizontal
    line and its 95% band: N and d are the same at every layer and checkpoint, so one
    floor serves the panel (the mean over its rows). False when the metric has none."""
    if "null_mean" not in sub.columns:
        return False
    has = sub[np.isfinite(sub["null_mean"].to_numpy(dtype=float))]
    if has.empty:
        return False
    ax.axhspan(float(has["null_lo"].mean()), float(has["null_hi"].mean()), color=FLOOR_STYLE["color"], alpha=0.1,
               linewidth=0)
    ax.axhline(float(has["null_mean"].mean()), **FLOOR_STYLE)
    return True


def _figure_metrics_by_step(summary: pd.DataFrame, title: str, data_label: str, train_log: pd.DataFrame | None,
                            metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    stage_steps = _stage_steps(summary)
    names = layer_names(summary)
    layers = sorted(names)
    color_of = _depth_colors(layers)
    n_panels = len(metrics) + (train_log is not None)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = new_figure(PANEL_WIDTH * ncols + 0.4, 2.7 * nrows + 1.9)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    flat = list(axes.flat)
    max_step = _max_step(stage_steps.values(), [] if train_log is None else train_log["step"])
    panel = 0
    if train_log is not None:
        _loss_panel(flat[0], train_log, sorted(stage_steps.values()))
        panel = 1
    counts = summary["n_prompts"] if "n_prompts" in summary.columns else pd.Series(dtype=float)
    n_prompts = fmt_range(counts[counts > 0])  # 0 where a metric is undefined (layer 0)
    floor_drawn = False
    for metric in metrics:
        ax = flat[panel]
        panel += 1
        ax.set_title(wrap_to_width(metric_short(metric), PANEL_WIDTH * 0.9, 10))
        sub = summary[summary["metric"] == metric]
        if sub.empty:  # not no_data(): clearing the x ticks would clear every shared axis
            ax.text(0.5, 0.5, esc(f"no data for {metric}"), ha="center", va="center", transform=ax.transAxes,
                    color="tab:red")
            ax.set_yticks([])
            continue
        for layer in layers:
            g = sub[sub["layer"] == layer].copy()
            g["order"] = [stage_steps.get(str(s), 0) for s in g["stage"]]
            g = g.sort_values("order")
            y = g["mean"].to_numpy(float)
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(g["step"].to_numpy(float)[ok], y[ok], marker="o", ms=3, lw=1.3, color=color_of[layer])
        floor_drawn = _draw_step_floor(ax, sub) or floor_drawn
        undefined = _undefined_layers(sub, names)
        if undefined:
            ax.text(0.98, 0.02, "not defined at " + ", ".join(map(esc, undefined)), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=7, color="0.35")
        values = sub["mean"].to_numpy(float)
        label = _short_label(metric)
        ax.set_ylabel(maybe_log_y(ax, values, label) if "norm" in metric else label)
        if ax.get_yscale() == "log":
            plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    for ax in flat[panel:]:
        ax.remove()
    used = flat[:panel]
    log_step_axis(flat[0], max_step)
    for col in range(ncols):
        column = [ax for i, ax in enumerate(used) if i % ncols == col]
        if column:
            column[-1].xaxis.set_tick_params(labelbottom=True)
            column[-1].set_xlabel(STEP_AXIS_LABEL)
    handles = [Line2D([], [], color=color_of[layer], marker="o", ms=3, lw=1.3) for layer in layers]
    labels = [esc(names[layer]) for layer in layers]
    if floor_drawn:
        handles.append(Line2D([], [], **FLOOR_STYLE))
        labels.append(FLOOR_LABEL)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(layers), 8),
               title=wrap_to_width(f"layer (colour = depth); each point: mean over {n_prompts} prompts at an analysed "
                                   f"checkpoint\nanalysed steps ({', '.join(map(str, stage_steps.values()))})",
                                   PANEL_WIDTH * ncols, 9))
    figure_title(fig, f"{title}: geometry across training", data_label)
    return fig


def plot_metrics_by_step(summary: pd.DataFrame, out_path: Path | str | Sequence[Path | str], title: str,
                         data_label: str, train_log: pd.DataFrame | None = None,
                         metrics: Sequence[str] = EVOLUTION_METRICS) -> Path:
    """Geometry metrics against the training step (log axis), one line per layer (colour = depth).

    Shows *when* during training the geometry forms and whether it tracks the loss: with
    ``train_log`` (``train_log.csv``) the top-left panel is the loss on the same step axis,
    dotted lines marking the analysed checkpoints. ``summary`` is an evolution ``summary.csv``
    (stages ``init``, ``step{N}``; x = its ``step`` column). The step axis is logarithmic
    (linear between 0 and 1, so initialization is shown): the checkpoints are log-spaced
    (``training.checkpoint_spacing``), dense early, where the geometry changes most. Lines
    are prompt means; the prompt spread is left out here to keep the layers readable.
    """
    return save(_figure_metrics_by_step(summary, title, data_label, train_log, metrics), out_path)


def _stage_step_text(stage: str) -> str:
    if stage == "init":
        return "init, step 0"
    m = re.fullmatch(r"step(\d+)", stage)
    return f"step {m[1]}" if m else stage


def _figure_heatmaps_before_after(npz_path: Path | str, title: str, data_label: str, before: str,
                                  after: str | None, prompt: int, max_words: int) -> Figure:
    mats, tokens, names = load_similarity(npz_path, prompt)
    if not mats:
        raise ValueError(f"{npz_path}: no similarity matrices for prompt {prompt}")
    stages = sorted({k[0] for k in mats}, key=stage_order)
    after = after or stages[-1]
    for stage in (before, after):
        if stage not in stages:
            raise ValueError(f"{npz_path}: stage {stage!r} not stored; stored stages: {stages}")
    view = similarity_view({k: m for k, m in mats.items() if k[0] in (before, after)}, tokens, max_words)
    shown = view.matrices
    layers = sorted({k[1] for k in shown})
    ticks = view.ticks(max_words)

    changes = {layer: centred_change(shown[(after, layer)], shown[(before, layer)]) for layer in layers
               if (before, layer) in shown and (after, layer) in shown}
    biggest = max((float(np.nanmax(np.abs(d))) for d, _ in changes.values() if np.isfinite(d).any()), default=0.0)
    dlim = max(0.1, math.ceil(biggest * 10) / 10)
    rows = [(f"before ({_stage_step_text(before)})", before), (f"after ({_stage_step_text(after)})", after),
            ("change beyond the mean shift", None)]
    fig = new_figure(2.9 * len(layers) + 1.9, 2.9 * len(rows) + 1.6)
    axes = fig.subplots(len(rows), len(layers), squeeze=False)
    mesh = mesh_diff = None
    for r, (row_title, stage) in enumerate(rows):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            layer_name = esc(names.get(layer, f"layer {layer}"))
            if stage is None and layer in changes:
                ax.set_title(f"{row_title}\n{layer_name} (mean shift {changes[layer][1]:+.2f})", fontsize=8)
            else:
                ax.set_title(f"{row_title}\n{layer_name}", fontsize=8)
            mat = changes[layer][0] if stage is None and layer in changes else shown.get((stage, layer))
            if mat is None:
                no_data(ax, "not stored")
                continue
            edges = {"bottom": r == len(rows) - 1, "left": c == 0}
            if stage is None:
                mesh_diff = heatmap_panel(ax, mat, CHANGE_CMAP, dlim, ticks, **edges)
            else:
                mesh = heatmap_panel(ax, mat, COSINE_CMAP, 1.0, ticks, **edges)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes[:2, :], shrink=0.8, label="cosine similarity (unitless)")
    if mesh_diff is not None:
        fig.colorbar(mesh_diff, ax=axes[2:, :], shrink=0.8, label=f"Δ cosine − mean shift (±{dlim:.1f})")
    suptitle(fig, f"{esc(title)}\n{esc(data_label)}\n"
                 f"cosine similarity before and after training (colour range fixed to [−1, 1]), prompt {prompt}: "
                 f"{esc(view.description)}\n"
                 "bottom: (after − its mean) − (before − its mean), off-diagonal means; the mean shift removed "
                 "is in each panel's title", fontsize=9)
    return fig


def plot_heatmaps_before_after(npz_path: Path | str, out_path: Path | str | Sequence[Path | str], title: str,
                               data_label: str, before: str = "init", after: str | None = None, prompt: int = 0,
                               max_words: int = HEATMAP_WORDS) -> Path:
    """Cosine-similarity heatmaps at the stored layers: before, after, and the change
    beyond the mean shift.

    ``after`` defaults to the last stage in the npz (by training step). The rows are the
    prompt's first ``max_words`` words (word × word means of the token matrix, see
    :func:`tga.figure_style.similarity_view`), so each is labelled with readable text.
    Before/after share the fixed [−1, 1] colour range. The bottom row subtracts each
    stage's mean off-diagonal cosine before differencing: the uniform rise of every
    cosine with training (anisotropy), stated per panel, would otherwise paint the whole
    matrix one colour and hide which pairs changed relative to the rest.
    """
    fig = _figure_heatmaps_before_after(npz_path, title, data_label, before, after, prompt, max_words)
    return save(fig, out_path)


def _figure_similarity_change(metrics_df: pd.DataFrame, title: str, data_label: str, before: str,
                              after: str | None, metric: str) -> Figure:
    df = metrics_df[metrics_df["metric"] == metric]
    if df.empty:
        raise ValueError(f"no {metric} values in the metrics table")
    stage_steps = _stage_steps(df)
    after = after or list(stage_steps)[-1]
    for stage in (before, after):
        if stage not in stage_steps:
            raise ValueError(f"stage {stage!r} not in the metrics table; stages: {list(stage_steps)}")
    names = layer_names(df)
    b = df[df["stage"] == before].pivot_table(index="prompt", columns="layer", values="value", dropna=False)
    a = df[df["stage"] == after].pivot_table(index="prompt", columns="layer", values="value", dropna=False)
    delta = (a - b).dropna(how="all")
    n_prompts = int(delta.shape[0])

    import seaborn as sns  # here, not at the top: see tga.figure_style's docstring

    fig = new_figure(11.0, 4.4)
    ax_abs, ax_diff = fig.subplots(1, 2)
    handles: list[object] = []
    labels: list[str] = []
    for stage, side, style_key in ((before, "before", "init"), (after, "after", "trained")):
        style = STAGE_STYLE[style_key]
        # straight from the long per-prompt table: line = mean over prompts, band = ±1 s.d. (ddof 1)
        sns.lineplot(data=df[df["stage"] == stage], x="layer", y="value", errorbar="sd", ax=ax_abs, marker="o",
                     markersize=3, markeredgewidth=0, err_kws={"alpha": BAND_ALPHA, "linewidth": 0}, legend=False,
                     **style)
        handles.append(Line2D([], [], marker="o", ms=3, **style))
        labels.append(f"{side}: {_stage_step_text(stage)}")
    if n_prompts >= 2:
        handles.append(Patch(color="0.6", alpha=0.5))
        labels.append(f"shaded: ±1 s.d. across {n_prompts} prompts")
    else:
        handles.append(Patch(color="none"))
        labels.append("1 prompt: no spread to show")
    ax_abs.legend(handles, labels, fontsize=8)
    ax_abs.set_ylabel(metric_label(metric), fontsize=9)
    ax_abs.set_title(f"{metric_short(metric)} before and after", fontsize=10)
    setup_layer_axis(ax_abs, names)
    ax_abs.grid(alpha=0.3)

    x = delta.columns.to_numpy(float)
    m = delta.mean(axis=0).to_numpy(float)
    sd = delta.std(axis=0, ddof=1).to_numpy(float)
    ax_diff.axhline(0.0, color="black", lw=0.8)
    offsets = np.linspace(-0.15, 0.15, n_prompts) if n_prompts > 1 else np.zeros(max(n_prompts, 1))
    for i, (_, row) in enumerate(delta.iterrows()):
        ax_diff.plot(x + offsets[i], row.to_numpy(float), linestyle="none", marker="o", ms=2.5, color="0.6",
                     zorder=1)
    has_sd = bool(np.isfinite(sd).any())
    ax_diff.errorbar(x, m, yerr=np.where(np.isfinite(sd), sd, 0.0) if has_sd else None, color="tab:purple",
                     marker="o", ms=4, capsize=4, lw=1.5, zorder=2)
    handles = [Line2D([], [], color="tab:purple", marker="o", ms=4),
               Line2D([], [], linestyle="none", marker="o", ms=2.5, color="0.6"),
               Line2D([], [], color="black", lw=0.8)]
    labels = [f"mean change over {n_prompts} prompts ± 1 s.d. across prompts (error bar)" if has_sd
              else f"change ({n_prompts} prompt{'s' if n_prompts != 1 else ''}: no spread)",
              "one prompt (after − before, paired by prompt)", "zero (no change)"]
    ax_diff.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)
    ax_diff.set_ylabel(f"Δ {metric_label(metric)}", fontsize=9)
    ax_diff.set_title(f"change: after ({_stage_step_text(after)}) − before ({_stage_step_text(before)})",
                      fontsize=10)
    setup_layer_axis(ax_diff, names)
    ax_diff.grid(alpha=0.3)
    figure_title(fig, f"{title}: change of {metric_short(metric)} with training", data_label)
    return fig


def plot_similarity_change(metrics_df: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                           before: str = "init", after: str | None = None,
                           metric: str = "mean_cosine") -> Path:
    """Per layer, how training changed the mean pairwise cosine (after − before, paired by prompt).

    ``metrics_df`` is a per-prompt geometry ``metrics.csv``; ``after`` defaults to the last
    stage by training step. Left: both stages with ±1 s.d. bands; right: the per-prompt
    differences (dots), their mean and ±1 s.d. across prompts.
    """
    return save(_figure_similarity_change(metrics_df, title, data_label, before, after, metric), out_path)



#: The evolution figures of one model, in the order :func:`plot_evolution_figures` draws them.
EVOLUTION_FIGURES: tuple[str, ...] = ("metrics_by_step", "heatmaps_before_after", "similarity_change")


def plot_evolution_figures(summary: pd.DataFrame, npz_path: Path | str, metrics_df: pd.DataFrame,
                           out_paths: Mapping[str, Path | str | Sequence[Path | str]], title: str, data_label: str,
                           train_log: pd.DataFrame | None = None) -> dict[str, Path]:
    """Every evolution figure of one model (:data:`EVOLUTION_FIGURES`) in one call, so the
    workflow pays the interpreter's, pandas' and matplotlib's start-up once per model, not
    once per figure.

    ``out_paths`` maps each figure name to its file or files (the PNG plus the
    ``figures.format`` copy); the figures are the ones :func:`plot_metrics_by_step` (from
    the evolution ``summary`` and ``train_log``), :func:`plot_heatmaps_before_after` (from
    ``npz_path``) and :func:`plot_similarity_change` (from ``metrics_df``) draw, with
    their default stages. Returns {figure name: first file written}.
    """
    if set(out_paths) != set(EVOLUTION_FIGURES):
        raise ValueError(f"evolution figures: output paths given for {sorted(out_paths)}, "
                         f"expected exactly {list(EVOLUTION_FIGURES)}")
    return {
        "metrics_by_step": plot_metrics_by_step(summary, out_paths["metrics_by_step"], title, data_label,
                                                train_log=train_log),
        "heatmaps_before_after": plot_heatmaps_before_after(npz_path, out_paths["heatmaps_before_after"], title,
                                                            data_label),
        "similarity_change": plot_similarity_change(metrics_df, out_paths["similarity_change"], title, data_label),
    }
