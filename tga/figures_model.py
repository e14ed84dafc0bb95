"""Figures of one model: geometry across layers, similarity heatmaps, training curves.

Each takes one model's files (geometry ``summary.csv``, ``similarity.npz``,
``train_log.csv``), init against trained; the styling comes from :mod:`tga.figure_style`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tga.figure_style import (
    BAND_ALPHA,
    COSINE_CMAP,
    FLOOR_LABEL,
    FLOOR_STYLE,
    HEATMAP_WORDS,
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
    plain_log_ticks,
    save,
    setup_layer_axis,
    figure_title,
    train_loss_steps,
    similarity_view,
    suptitle,
    stage_step,
)
from tga.tables import STAGES, layer_names

__all__ = ["MODEL_FIGURES", "plot_geometry_layers", "plot_model_figures", "plot_similarity_heatmaps",
           "plot_training_curves"]


def _prompt_band_label(df: pd.DataFrame) -> str:
    n = fmt_range(df["n_prompts"]) if "n_prompts" in df.columns else "?"
    return f"shaded: ±1 s.d. across {n} prompts"


_YLABEL_WIDTH = 44  # characters per line: a longer label wraps instead of running into the title


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
    ax.plot(x, f["null_mean"].to_numpy(dtype=float), label=FLOOR_LABEL, **FLOOR_STYLE)
    ax.fill_between(x, f["null_lo"].to_numpy(dtype=float), f["null_hi"].to_numpy(dtype=float),
                    color=FLOOR_STYLE["color"], alpha=0.1, linewidth=0)
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
            plain_log_ticks(ax, one_two_five=True)
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
                                max_words: int, names: dict[int, str] | None) -> Figure:
    stored, tokens, stored_names = load_similarity(npz_path, prompt)
    mats = {key: mat for key, mat in stored.items() if key[0] in STAGES}
    if not mats:
        raise ValueError(f"{npz_path}: no init/trained similarity matrices for prompt {prompt}")
    names = stored_names if names is None else names
    view = similarity_view(mats, tokens, max_words)
    stages = [s for s in STAGES if any(k[0] == s for k in mats)]
    layers = sorted({k[1] for k in mats})
    ticks = view.ticks(max_words)

    fig = new_figure(2.9 * len(layers) + 1.6, 2.9 * len(stages) + 1.4)
    axes = fig.subplots(len(stages), len(layers), squeeze=False)
    mesh = None
    for r, stage in enumerate(stages):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            ax.set_title(f"{stage}: {esc(names.get(layer, f'layer {layer}'))}", fontsize=9)
            mat = view.matrices.get((stage, layer))
            if mat is None:
                no_data(ax, "not stored")
                continue
            mesh = heatmap_panel(ax, mat, COSINE_CMAP, 1.0, ticks, bottom=r == len(stages) - 1, left=c == 0)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, shrink=0.8, label="cosine similarity (unitless)")
    suptitle(fig, f"{esc(title)}\n{esc(data_label)}\ncosine similarity, prompt {prompt}: {esc(view.description)}; "
                 "colour range fixed to [−1, 1]", fontsize=9)
    return fig


def plot_similarity_heatmaps(npz_path: Path | str, out_path: Path | str | Sequence[Path | str], title: str,
                             data_label: str, prompt: int = 0, max_words: int = HEATMAP_WORDS,
                             layer_names: dict[int, str] | None = None) -> Path:
    """Cosine-similarity matrices per stored layer (rows init/trained) for one prompt.

    The rows are the prompt's first ``max_words`` words (word × word means of the token
    matrix, :func:`tga.figure_style.similarity_view`), each labelled with its text. The
    colour range is fixed to [−1, 1] so panels are comparable by eye. ``layer_names``
    (layer index -> name) titles the columns; by default the npz's ``layer_names`` entry
    (written by the geometry step) is used, else they read 'layer j'.
    """
    fig = _figure_similarity_heatmaps(npz_path, title, data_label, prompt, max_words, layer_names)
    return save(fig, out_path)


def _schedule(training: Mapping[str, Any] | None, log: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """(update number, learning rate, label) of the schedule itself, from the training
    loop's own function; without the settings, the learning rate of the log rows (one per
    ``eval_interval`` steps), and the label says so."""
    if training is None:
        lr = log[["step", "lr"]].dropna()
        return (lr["step"].to_numpy(float), lr["lr"].to_numpy(float),
                "learning rate at the log rows (settings not given)")
    from tga.schema import TrainConfig
    from tga.train import learning_rate_at  # torch: only this figure pays for it

    config = TrainConfig.from_dict(dict(training))
    updates = np.arange(1, config.max_steps + 1)
    # update n (the log's step n) is taken with learning_rate_at(n - 1): the loop's step index
    lr = np.array([learning_rate_at(int(n) - 1, config) for n in updates])
    return updates.astype(float), lr, f"schedule: {config.warmup_steps} warmup steps, then cosine decay"


def _figure_training_curves(log: pd.DataFrame, title: str, data_label: str,
                            training: Mapping[str, Any] | None) -> Figure:
    log = log.sort_values("step")
    fig = new_figure(13.0, 4.2)
    ax_loss, ax_ppl, ax_lr = fig.subplots(1, 3, sharex=True)

    va = log[["step", "val_loss", "val_ppl"]].dropna(subset=["val_loss"])
    ax_loss.plot(*train_loss_steps(log), color="tab:blue", lw=1.2, drawstyle="steps-pre",
                 label="train loss, mean over each log interval")
    ax_loss.plot(va["step"], va["val_loss"], color="tab:red", marker="o", ms=3, lw=1,
                 label="validation loss (evaluation windows)")
    ax_loss.set(xlabel="training step", ylabel="loss (nats/token)", title="cross-entropy loss")
    ax_loss.legend(loc="upper right")

    vp = log[["step", "val_ppl"]].dropna()
    if vp.empty:
        ax_ppl.text(0.5, 0.5, "no validation evaluations", ha="center", va="center", transform=ax_ppl.transAxes,
                    color="tab:red")
    else:
        ax_ppl.plot(vp["step"], vp["val_ppl"], color="tab:red", marker="o", ms=3, label="validation perplexity")
        ax_ppl.set_yscale("log")
        plain_log_ticks(ax_ppl)
        last = vp.iloc[-1]
        ax_ppl.annotate(f"{last['val_ppl']:.2f}", (last["step"], last["val_ppl"]), textcoords="offset points",
                        xytext=(-4, 6), ha="right", fontsize=8)
        ax_ppl.legend(loc="upper right")
    ax_ppl.set(xlabel="training step", ylabel="validation perplexity (tokens) [log scale]",
               title="validation perplexity")

    steps, lr, label = _schedule(training, log)
    ax_lr.plot(steps, lr, color="tab:green", lw=1.5, label=label)
    logged = log[["step", "lr"]].dropna()
    if training is not None and not logged.empty:
        ax_lr.plot(logged["step"], logged["lr"], linestyle="none", marker="o", ms=3, color="0.25",
                   label="logged at the log rows (check)")
    ax_lr.set(xlabel="training step", ylabel="learning rate (per step)", title="learning-rate schedule")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.legend(loc="best")
    for ax in (ax_loss, ax_ppl, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_tick_params(labelbottom=True)
    figure_title(fig, title, data_label)
    return fig


def plot_training_curves(log: pd.DataFrame, out_path: Path | str | Sequence[Path | str], title: str,
                         data_label: str, training: Mapping[str, Any] | None = None) -> Path:
    """Loss, validation perplexity and learning rate against the step, sharing the step
    axis, to judge convergence and the schedule.

    ``log`` is ``train_log.csv``. ``training`` (the run's resolved ``training`` settings)
    draws the learning rate from the training loop's own schedule
    (:func:`tga.train.learning_rate_at`) at every step, so the warmup is seen as it was;
    the log's rows, one per ``eval_interval`` steps, are drawn on it as a check. The
    train loss of a row is the mean since the previous row, drawn as a step over that window.
    """
    return save(_figure_training_curves(log, title, data_label, training), out_path)


#: The figures of one model, in the order :func:`plot_model_figures` draws them.
MODEL_FIGURES: tuple[str, ...] = ("geometry_layers", "similarity_heatmaps", "training_curves")


def plot_model_figures(summary: pd.DataFrame, npz_path: Path | str, log: pd.DataFrame,
                       out_paths: Mapping[str, Path | str | Sequence[Path | str]], title: str, data_label: str,
                       training: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Every figure of one model (:data:`MODEL_FIGURES`) in one call, so the workflow pays
    the interpreter's, pandas' and matplotlib's start-up once per model, not once per figure.

    ``out_paths`` maps each figure name to its file or files (the PNG plus the
    ``figures.format`` copy); the figures are the ones :func:`plot_geometry_layers`
    (from ``summary``), :func:`plot_similarity_heatmaps` (from ``npz_path``) and
    :func:`plot_training_curves` (from ``log`` and ``training``) draw. Returns
    {figure name: first file written}.
    """
    if set(out_paths) != set(MODEL_FIGURES):
        raise ValueError(f"model figures: output paths given for {sorted(out_paths)}, "
                         f"expected exactly {list(MODEL_FIGURES)}")
    return {
        "geometry_layers": plot_geometry_layers(summary, out_paths["geometry_layers"], title, data_label),
        "similarity_heatmaps": plot_similarity_heatmaps(npz_path, out_paths["similarity_heatmaps"], title, data_label),
        "training_curves": plot_training_curves(log, out_paths["training_curves"], title, data_label,
                                                training=training),
    }
