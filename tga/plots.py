"""Figures for tga: one public function per figure, inputs are DataFrames / paths.

Every figure states what it shows: axis labels carry units (``METRIC_LABELS``), the
title names the variant(s) and seed(s), a subtitle carries the caller's ``data_label``
(what was trained on / evaluated on), and every shaded band or error bar says in the
legend what it is (±1 s.d. across prompts, or a 95% t-interval across seeds).

Output is deterministic (Agg backend, no timestamps / software version in metadata) and
written atomically (temp file in the target folder, then ``os.replace``), so Snakemake
never sees a half-written figure and reruns on the same data are byte-identical.

The numbers a figure draws come from elsewhere: intervals and tests from ``tga.stats``,
the A − B table from ``tga.compare.compute_differences``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tga.stats import CORRECTION_TEXT, mean_ci95  # noqa: E402

__all__ = [
    "METRIC_LABELS",
    "metric_label",
    "plot_geometry_layers",
    "plot_similarity_heatmaps",
    "plot_training_curves",
    "plot_similarity_by_layer",
    "plot_differences",
    "plot_perplexity",
    "EVOLUTION_METRICS",
    "plot_metrics_by_step",
    "plot_heatmaps_before_after",
    "plot_similarity_change",
    "plot_loss_by_step",
]

#: Axis label (with units) for every geometry metric; used by every figure.
METRIC_LABELS: dict[str, str] = {
    "mean_cosine": "mean pairwise cosine similarity (unitless)",
    "cross_prompt_cosine": "cross-prompt cosine, anisotropy baseline (unitless)",
    "adjusted_cosine": "mean cosine minus cross-prompt baseline (unitless)",
    "common_direction_share": "share of ‖h‖² along the mean direction (unitless)",
    "token_norm": "mean token L2 norm",
    "update_norm": "mean update L2 norm ‖h_l − h_(l−1)‖",
    "effective_rank": "effective rank (dimensions)",
    "rank1_residual": "rank-1 residual fraction (unitless)",
    "twonn": "TwoNN intrinsic dimension, Facco fit (dimensions)",
    "twonn_mle": "TwoNN intrinsic dimension, MLE (dimensions)",
    "knn_overlap": "k-NN overlap fraction (unitless)",
    "mean_logit_freq_corr": "Pearson r, mean-vector logits vs log train frequency (unitless)",
}

#: Stage styling shared by all per-model and difference figures.
STAGE_STYLE: dict[str, dict[str, str]] = {
    "init": {"color": "tab:orange", "linestyle": "--"},
    "trained": {"color": "tab:blue", "linestyle": "-"},
}
STAGES: tuple[str, str] = ("init", "trained")

DPI = 120
BAND_ALPHA = 0.2


# ----------------------------------------------------------------------------- text


def metric_label(metric: str) -> str:
    """Axis label for a metric; unknown metrics fall back to their raw name (visible, not hidden)."""
    return METRIC_LABELS.get(metric, metric)


def _metric_short(metric: str) -> str:
    """Label without the trailing '(units)' part, for panel titles."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", metric_label(metric))


def _esc(text: object) -> str:
    """Escape '$' so user strings (variants, tokens, labels) are never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def _token_label(token: str, max_len: int = 12) -> str:
    """Make whitespace visible and keep tick labels short; a bare ' the' must not look like 'the'."""
    s = str(token).replace("\n", "↵").replace("\t", "→").replace("\r", "")
    s = s.replace(" ", "␣")
    if len(s) > max_len:
        s = s[: max_len - 1] + "…"
    return _esc(s) if s else "∅"


def _fmt_seeds(seeds: Iterable[object]) -> str:
    vals = sorted({int(s) for s in seeds})
    if not vals:
        return "seeds: none"
    return f"seed {vals[0]}" if len(vals) == 1 else "seeds " + ", ".join(map(str, vals))


def _fmt_range(values: Iterable[object]) -> str:
    vals = sorted({int(v) for v in values if pd.notna(v)})
    if not vals:
        return "?"
    return str(vals[0]) if vals[0] == vals[-1] else f"{vals[0]}–{vals[-1]}"


def _title(fig: Figure, title: str, data_label: str) -> None:
    """Title plus the data-provenance subtitle on its own line."""
    fig.suptitle(f"{_esc(title)}\n{_esc(data_label)}", fontsize=11)


# ----------------------------------------------------------------------------- saving


def _save(fig: Figure, out_path: Path | str) -> Path:
    """Write atomically with deterministic metadata so reruns are byte-identical."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    metadata = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
        "svg": {"Date": None, "Creator": None},
    }.get(fmt)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()  # built without pyplot: nothing global to close, clearing frees the artists
    return out


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# ----------------------------------------------------------------------------- layer axis


def layer_names(df: pd.DataFrame) -> dict[int, str]:
    """layer index -> layer_name (first seen); the x axis is the layer index."""
    if df.empty:
        return {}
    pairs = df[["layer", "layer_name"]].dropna().drop_duplicates("layer").sort_values("layer")
    return {int(l): str(n) for l, n in zip(pairs["layer"], pairs["layer_name"])}


def _setup_layer_axis(ax: Axes, names: dict[int, str], xlabel: str = "layer") -> None:
    layers = sorted(names)
    ax.set_xticks(layers)
    ax.set_xticklabels([_esc(names[l]) for l in layers], rotation=45 if len(layers) > 4 else 0,
                       ha="right" if len(layers) > 4 else "center", fontsize=8)
    ax.set_xlabel(xlabel)
    if layers:
        ax.set_xlim(layers[0] - 0.3, layers[-1] + 0.3)


def _maybe_log_y(ax: Axes, values: np.ndarray, label: str) -> str:
    """Norms can span orders of magnitude across depth (Pre-LN growth); switch to log y then, and say so."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > 50:
        ax.set_yscale("log")
        return f"{label} [log scale]"
    return label


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, _esc(text), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="tab:red")
    ax.set_xticks([])
    ax.set_yticks([])


def _variant_colors(variants: Sequence[str]) -> dict[str, tuple]:
    """Colour by sorted name so a variant keeps its colour across figures."""
    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(sorted(variants))}


def _stage_step(df: pd.DataFrame, stage: str) -> str:
    if "step" not in df.columns:
        return stage
    steps = df.loc[df["stage"] == stage, "step"].dropna().unique()
    return f"{stage} (step {_fmt_range(steps)})" if len(steps) else stage


def _prompt_band_label(df: pd.DataFrame) -> str:
    n = _fmt_range(df["n_prompts"]) if "n_prompts" in df.columns else "?"
    return f"shaded: ±1 s.d. across {n} prompts"


# ----------------------------------------------------------------------------- 1. per-model layers


def _figure_geometry_layers(summary: pd.DataFrame, title: str, data_label: str,
                            metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    fig = _new_figure(4.2 * len(metrics), 4.0)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    legend_done = False
    for ax, metric in zip(axes, metrics):
        sub = summary[(summary["metric"] == metric) & summary["stage"].isin(STAGES)]
        ax.set_title(_metric_short(metric), fontsize=10)
        if sub.empty:
            _no_data(ax, f"no data for {metric}")
            continue
        for stage in STAGES:
            s = sub[sub["stage"] == stage].sort_values("layer")
            if s.empty:
                continue
            x = s["layer"].to_numpy(dtype=float)
            m = s["mean"].to_numpy(dtype=float)
            sd = s["std"].to_numpy(dtype=float)
            style = STAGE_STYLE[stage]
            ax.plot(x, m, marker="o", ms=3, label=_stage_step(summary, stage), **style)
            ax.fill_between(x, m - sd, m + sd, color=style["color"], alpha=BAND_ALPHA, linewidth=0)
        _setup_layer_axis(ax, layer_names(sub))
        lo_hi = np.concatenate([(sub["mean"] - sub["std"]).to_numpy(float), sub["mean"].to_numpy(float)])
        ax.set_ylabel(_maybe_log_y(ax, lo_hi, metric_label(metric)) if "norm" in metric
                      else metric_label(metric))
        ax.grid(alpha=0.3)
        if not legend_done:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Patch(color="0.6", alpha=0.5))
            labels.append(_prompt_band_label(sub))
            ax.legend(handles, labels, fontsize=8)
            legend_done = True
    _title(fig, title, data_label)
    return fig


def plot_geometry_layers(summary: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                         metrics: Sequence[str] = ("mean_cosine", "token_norm", "update_norm")) -> Path:
    """One model's per-layer geometry, init vs trained, so the effect of training is visible per depth.

    ``summary`` is a geometry ``summary.csv`` (stage,step,layer,layer_name,metric,mean,std,n_prompts).
    Bands are ±1 s.d. across prompts. A metric absent from the data gets a 'no data' panel.
    """
    return _save(_figure_geometry_layers(summary, title, data_label, metrics), out_path)


# ----------------------------------------------------------------------------- 2. heatmaps

_NPZ_KEY = re.compile(r"^(?P<stage>[^/]+)/layer(?P<layer>\d+)/prompt(?P<prompt>\d+)$")


def _label_heatmap_axes(ax: Axes, ticks: list[int], tick_labels: list[str], axis_name: str, fontsize: float,
                        bottom: bool, left: bool) -> None:
    """Token tick labels only on the outer edge of a heatmap grid."""
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if bottom:
        ax.set_xticklabels(tick_labels, rotation=90, fontsize=fontsize)
        ax.set_xlabel(axis_name, fontsize=8)
    else:
        ax.set_xticklabels([])
    if left:
        ax.set_yticklabels(tick_labels, fontsize=fontsize)
        ax.set_ylabel(axis_name, fontsize=8)
    else:
        ax.set_yticklabels([])


def _figure_similarity_heatmaps(npz_path: Path | str, title: str, data_label: str, prompt: int,
                                max_tick_labels: int, layer_names: dict[int, str] | None) -> Figure:
    with np.load(npz_path, allow_pickle=False) as npz:
        mats: dict[tuple[str, int], np.ndarray] = {}
        for key in npz.files:
            m = _NPZ_KEY.match(key)
            if m and int(m["prompt"]) == prompt and m["stage"] in STAGES:
                mats[(m["stage"], int(m["layer"]))] = np.asarray(npz[key], dtype=float)
        if layer_names is None and "layer_names" in npz.files:
            layer_names = dict(enumerate(str(n) for n in npz["layer_names"]))
        tok_key = f"tokens/prompt{prompt}"
        tokens = [str(t) for t in npz[tok_key]] if tok_key in npz.files else None
    if not mats:
        raise ValueError(f"{npz_path}: no init/trained similarity matrices for prompt {prompt}")
    stages = [s for s in STAGES if any(k[0] == s for k in mats)]
    layers = sorted({k[1] for k in mats})
    T = next(iter(mats.values())).shape[0]
    if tokens is not None and len(tokens) != T:
        tokens = None  # never label rows with the wrong tokens
    step = max(1, math.ceil(T / max(1, max_tick_labels)))
    ticks = list(range(0, T, step))
    tick_labels = [_token_label(tokens[i]) for i in ticks] if tokens else [str(i) for i in ticks]
    axis_name = "token" if tokens else "token position"
    if step > 1:
        axis_name += f" (1 in {step} labelled)"
    fontsize = 8 if len(ticks) <= 12 else (6 if len(ticks) <= 24 else 4.5)

    fig = _new_figure(2.5 * len(layers) + 1.2, 2.6 * len(stages) + 1.0)
    axes = fig.subplots(len(stages), len(layers), squeeze=False)
    im = None
    for r, stage in enumerate(stages):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            name = (layer_names or {}).get(layer, f"layer {layer}")
            ax.set_title(f"{stage}: {_esc(name)}", fontsize=9)
            mat = mats.get((stage, layer))
            if mat is None:
                _no_data(ax, "not stored")
                continue
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
            _label_heatmap_axes(ax, ticks, tick_labels, axis_name, fontsize,
                                bottom=r == len(stages) - 1, left=c == 0)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="cosine similarity (unitless)")
    fig.suptitle(f"{_esc(title)}\n{_esc(data_label)}\n"
                 f"pairwise token cosine similarity, prompt {prompt} ({T} tokens), colour range fixed to [−1, 1]",
                 fontsize=10)
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
    return _save(fig, out_path)


# ----------------------------------------------------------------------------- 3. training curves


def _figure_training_curves(log: pd.DataFrame, title: str, data_label: str) -> Figure:
    log = log.sort_values("step")
    fig = _new_figure(13.0, 4.0)
    ax_loss, ax_ppl, ax_lr = fig.subplots(1, 3)

    tr = log[["step", "train_loss"]].dropna()
    va = log[["step", "val_loss", "val_ppl"]].dropna(subset=["val_loss"])
    ax_loss.plot(tr["step"], tr["train_loss"], color="tab:blue", lw=1, label="train loss (batch)")
    ax_loss.plot(va["step"], va["val_loss"], color="tab:red", marker="o", ms=3, label="validation loss")
    ax_loss.set(xlabel="training step", ylabel="loss (nats/token)", title="cross-entropy loss")
    ax_loss.legend(fontsize=8)

    vp = log[["step", "val_ppl"]].dropna()
    if vp.empty:
        _no_data(ax_ppl, "no validation evaluations")
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
    _title(fig, title, data_label)
    return fig


def plot_training_curves(log: pd.DataFrame, out_path: Path | str, title: str, data_label: str) -> Path:
    """Loss, validation perplexity and LR schedule vs step, to judge convergence and schedule sanity.

    ``log`` is ``train_log.csv``; rows without validation values are skipped only for val series.
    """
    return _save(_figure_training_curves(log, title, data_label), out_path)


# ----------------------------------------------------------------------------- 4. cross-variant


def per_seed_means(summaries: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One row per (variant, seed, stage, metric, layer) with that seed's prompt-mean."""
    df = summaries if metric is None else summaries[summaries["metric"] == metric]
    keys = ["variant", "seed", "stage", "metric", "layer"]
    agg = {"mean": ("mean", "mean"), "std": ("std", "mean"), "layer_name": ("layer_name", "first")}
    if "n_prompts" in df.columns:
        agg["n_prompts"] = ("n_prompts", "min")
    return df.groupby(keys, as_index=False, sort=True).agg(**agg)


def _figure_similarity_by_layer(summaries: pd.DataFrame, data_label: str, metric: str) -> Figure:
    per_seed = per_seed_means(summaries, metric)
    variants = sorted(per_seed["variant"].unique())
    colors = _variant_colors(variants)
    fig = _new_figure(11.0, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    legend: dict[str, object] = {}
    name_sets = per_seed.groupby("layer")["layer_name"].nunique() if not per_seed.empty else pd.Series(dtype=int)
    consistent = bool((name_sets <= 1).all())
    for ax, stage in zip(axes, STAGES):
        ax.set_title(_stage_step(per_seed, stage), fontsize=10)
        sdf = per_seed[per_seed["stage"] == stage]
        if sdf.empty:
            _no_data(ax, f"no {stage} data")
            continue
        for variant in variants:
            vdf = sdf[sdf["variant"] == variant]
            if vdf.empty:
                continue
            seeds = sorted(vdf["seed"].unique())
            if len(seeds) >= 2:
                rows = [(layer, *mean_ci95(g["mean"])) for layer, g in vdf.groupby("layer", sort=True)]
                x = np.array([r[0] for r in rows], dtype=float)
                m, lo, hi = (np.array([r[i] for r in rows], dtype=float) for i in (1, 2, 3))
                label = f"{_esc(variant)}: mean ± 95% CI over {len(seeds)} seeds"
            else:
                g = vdf.sort_values("layer")
                x = g["layer"].to_numpy(float)
                m = g["mean"].to_numpy(float)
                sd = g["std"].to_numpy(float)
                lo, hi = m - sd, m + sd
                n_p = _fmt_range(g["n_prompts"]) if "n_prompts" in g.columns else "?"
                label = f"{_esc(variant)}: seed {int(seeds[0])}, ±1 s.d. across {n_p} prompts"
            (line,) = ax.plot(x, m, marker="o", ms=3, color=colors[variant], label=label)
            ax.fill_between(x, lo, hi, color=colors[variant], alpha=BAND_ALPHA, linewidth=0)
            legend.setdefault(label, line)
        if consistent:
            _setup_layer_axis(ax, layer_names(sdf))
        else:
            ax.set_xlabel("layer index (0 = embedding; depth differs across variants)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric_label(metric))
    if legend:
        fig.legend(list(legend.values()), list(legend.keys()), loc="outside lower center",
                   ncols=2 if len(legend) > 3 else len(legend), fontsize=8)
    seeds_txt = _fmt_seeds(per_seed["seed"]) if not per_seed.empty else "no data"
    _title(fig, f"{_metric_short(metric)} by layer: {len(variants)} variants, {seeds_txt}", data_label)
    return fig


def plot_similarity_by_layer(summaries: pd.DataFrame, out_path: Path | str, data_label: str,
                             metric: str = "mean_cosine") -> Path:
    """All variants on one axis per stage, so architecture effects on a metric can be compared.

    ``summaries`` = concatenated summary.csv files plus ``variant`` and ``seed`` columns.
    ≥2 seeds: line = mean over seeds of per-seed prompt-means, band = 95% t-CI over seeds.
    1 seed: line = prompt-mean, band = ±1 s.d. across prompts. The legend says which.
    """
    return _save(_figure_similarity_by_layer(summaries, data_label, metric), out_path)


# ----------------------------------------------------------------------------- 5. differences


def stage_order(stage: str) -> tuple[int, int]:
    """init < step{N} (by N) < trained."""
    if stage == "init":
        return (0, 0)
    if stage == "trained":
        return (2, 0)
    m = re.fullmatch(r"step(\d+)", str(stage))
    return (1, int(m[1])) if m else (1, 10**12)


def _method_text(g: pd.DataFrame) -> str:
    """Per-panel note on how the CI was formed (layers without data, e.g. update_norm at 0, ignored)."""
    g = g[g["method"] != "no-data"]
    methods = set(g["method"])
    if methods == {"paired"}:
        return f"paired by seed, n = {_fmt_range(g['n_seeds'])} seeds"
    if "welch" in methods:
        return f"Welch (unpaired), n = {_fmt_range(g['n_a'])} vs {_fmt_range(g['n_b'])} seeds"
    return "1 seed: no CI"


def _family_text(df: pd.DataFrame) -> str:
    """How many tests each correction family held (one family = one comparison and stage)."""
    if "n_tests" not in df.columns:
        return "the layer × metric tests of each comparison and stage"
    sizes = pd.to_numeric(df["n_tests"], errors="coerce").dropna()
    sizes = sizes[sizes > 0]
    counts = _fmt_range(sizes.astype(int)) if not sizes.empty else "0"
    return f"the {counts} layer × metric tests of each comparison and stage"


def _figure_differences(diff_df: pd.DataFrame, data_label: str, metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    df = diff_df.copy()
    if "missing" not in df.columns:
        df["missing"] = ""
    df["missing"] = df["missing"].fillna("").astype(str)
    comps = list(dict.fromkeys(zip(df["comparison"], df["a"], df["b"])))
    n_rows = max(1, len(comps))
    fig = _new_figure(4.2 * len(metrics), 2.9 * n_rows + 1.0)
    axes = fig.subplots(n_rows, len(metrics), squeeze=False)
    if not comps:
        for ax in axes[0]:
            _no_data(ax, "no comparisons")
    any_ci = False
    for r, (comp, a, b) in enumerate(comps):
        cdf = df[df["comparison"] == comp]
        missing = ", ".join(dict.fromkeys(m for m in cdf["missing"] if m))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            ax.set_title(f"{_esc(a)} − {_esc(b)}", fontsize=9)
            if missing:
                _no_data(ax, f"missing: {missing}")
                continue
            g = cdf[(cdf["metric"] == metric) & cdf["stage"].isin(STAGES) & cdf["layer"].notna()]
            if g.empty:
                _no_data(ax, f"no data for {metric}")
                continue
            ax.axhline(0.0, color="black", lw=0.8)
            for stage in STAGES:
                s = g[g["stage"] == stage].sort_values("layer")
                if s.empty:
                    continue
                style = STAGE_STYLE[stage]
                x = s["layer"].to_numpy(dtype=float)
                ax.plot(x, s["mean_diff"].to_numpy(float), marker="o", ms=3, **style)
                lo, hi = s["ci_low"].to_numpy(float), s["ci_high"].to_numpy(float)
                if np.isfinite(lo).any():
                    any_ci = True
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=BAND_ALPHA, linewidth=0)
                star = s[s["significant"].astype(bool)]
                if not star.empty:
                    ax.plot(star["layer"].to_numpy(float), star["mean_diff"].to_numpy(float), linestyle="none",
                            marker="*", ms=11, color=style["color"], markeredgecolor="black", markeredgewidth=0.5)
            _setup_layer_axis(ax, layer_names(g))
            ax.set_ylabel(f"Δ {metric_label(metric)}", fontsize=8)
            ax.text(0.02, 0.97, _method_text(g), transform=ax.transAxes, ha="left", va="top", fontsize=7,
                    color="0.25", bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.85, "pad": 2})
            ax.grid(alpha=0.3)
    handles: list[object] = [Line2D([], [], marker="o", ms=3, **STAGE_STYLE[s]) for s in STAGES]
    labels = ["init: A − B (dashed)", "trained: A − B (solid)"]
    handles.append(Line2D([], [], color="black", lw=0.8))
    labels.append("zero (no difference)")
    if any_ci:
        handles.append(Patch(color="0.6", alpha=0.5))
        labels.append("shaded: 95% CI of A − B across seeds (paired t if same seeds, else Welch)")
    if any_ci:
        handles.append(Line2D([], [], linestyle="none", marker="*", ms=11, color="0.5", markeredgecolor="black"))
        labels.append(f"star: significant after {CORRECTION_TEXT} over {_family_text(df)}")
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    seeds_note = ""
    if "method" in df.columns and (df["method"] == "single-seed").all():
        seeds_note = " (single seed: no uncertainty estimate)"
    _title(fig, f"Architecture differences A − B by layer{seeds_note}", data_label)
    return fig


def plot_differences(diff_df: pd.DataFrame, out_path: Path | str, data_label: str,
                     metrics: Sequence[str] = ("mean_cosine", "token_norm", "update_norm")) -> Path:
    """Grid of A − B per layer (rows = comparisons, columns = metrics) from ``tga.compare.compute_differences``.

    Stars mark layers whose difference is significant after the Benjamini–Hochberg
    correction (``significant`` in the table); a comparison with a variant lacking data
    shows 'missing: <variant>' instead of vanishing.
    """
    return _save(_figure_differences(diff_df, data_label, metrics), out_path)


# ----------------------------------------------------------------------------- 6. perplexity


def _bar_panel(ax: Axes, ppl: pd.DataFrame, variants: list[str], column: str, ylabel: str,
               colors: dict[str, tuple]) -> None:
    ymax = 0.0
    for i, variant in enumerate(variants):
        vals = ppl.loc[ppl["variant"] == variant, column].astype(float).dropna().to_numpy()
        if vals.size == 0:
            ax.text(i, 0.02, "missing", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=8, color="tab:red")
            continue
        mean, lo, hi, n = mean_ci95(vals)
        yerr = None if n < 2 else np.array([[mean - lo], [hi - mean]])
        ax.bar(i, mean, color=colors[variant], alpha=0.6, width=0.7, yerr=yerr, capsize=4,
               error_kw={"elinewidth": 1.2})
        offsets = np.linspace(-0.18, 0.18, vals.size) if vals.size > 1 else np.zeros(1)
        ax.plot(i + offsets, vals, linestyle="none", marker="o", ms=4, color="black")
        text = f"{mean:.2f}" if n < 2 else f"{mean:.2f}\n±{hi - mean:.2f}"
        top = max(hi if n >= 2 else mean, float(vals.max()))
        ymax = max(ymax, top)
        ax.annotate(text, (i, top), textcoords="offset points", xytext=(0, 6), ha="center",
                    va="bottom", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(variants)))
    counts = [int(ppl.loc[ppl["variant"] == v, column].notna().sum()) for v in variants]
    ax.set_xticklabels([f"{_esc(v)}\n(n={k})" for v, k in zip(variants, counts)], rotation=30, ha="right",
                       fontsize=8)
    ax.set_xlabel("variant (n = seeds)")
    ax.set_ylim(0, ymax * 1.2 if ymax > 0 else 1.0)  # from zero: bar heights stay proportional
    ax.grid(axis="y", alpha=0.3)


def _figure_perplexity(ppl: pd.DataFrame, data_label: str) -> Figure:
    variants = list(dict.fromkeys(ppl["variant"]))
    colors = _variant_colors(variants)
    fig = _new_figure(max(9.0, 1.6 * len(variants) + 3.0), 4.8)
    ax_ppl, ax_bpb = fig.subplots(1, 2)
    split = ", ".join(sorted(ppl["split"].dropna().astype(str).unique())) if "split" in ppl.columns else "test"
    split = split or "test"
    _bar_panel(ax_ppl, ppl, variants, "token_ppl", f"{split} token perplexity (tokens)", colors)
    ax_ppl.set_title("token perplexity (lower is better)", fontsize=10)
    _bar_panel(ax_bpb, ppl, variants, "bits_per_byte", f"{split} bits per byte (bits/byte)", colors)
    ax_bpb.set_title("bits per byte (tokenizer-independent)", fontsize=10)
    handles = [Patch(color="0.6", alpha=0.6), Line2D([], [], color="black"),
               Line2D([], [], linestyle="none", marker="o", ms=4, color="black")]
    labels = ["bar: mean over seeds", "error bar: 95% CI over seeds (t, n−1 df; only n ≥ 2)", "dot: one seed"]
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    title = f"{split} perplexity by variant ({_fmt_seeds(ppl['seed'])})" if "seed" in ppl.columns \
        else f"{split} perplexity by variant"
    if "tokenizer" in ppl.columns and ppl["tokenizer"].nunique() > 1:
        title += "; tokenizers differ, so compare bits/byte, not token perplexity"
    _title(fig, title, data_label)
    return fig


def plot_perplexity(ppl: pd.DataFrame, out_path: Path | str, data_label: str) -> Path:
    """Held-out token perplexity and bits/byte per variant: bars = mean over seeds, 95% CI, seed dots.

    ``ppl`` is ``outputs/compare/perplexity.csv`` (variant, seed, token_ppl, bits_per_byte, ...).
    Bars start at zero so relative differences are not exaggerated.
    """
    return _save(_figure_perplexity(ppl, data_label), out_path)


# ----------------------------------------------------------------------------- 7. model evolution

#: Metrics drawn against the training step (every metric the geometry step writes).
EVOLUTION_METRICS: tuple[str, ...] = (
    "mean_cosine", "cross_prompt_cosine", "adjusted_cosine", "common_direction_share", "token_norm",
    "update_norm", "effective_rank", "rank1_residual", "twonn", "twonn_mle", "knn_overlap",
    "mean_logit_freq_corr",
)
STEP_AXIS_LABEL = "training step (optimizer updates; 0 = initialization)"
_ANALYSED_STYLE = {"color": "0.55", "lw": 0.8, "linestyle": ":"}


def _stage_steps(df: pd.DataFrame) -> dict[str, int]:
    """stage -> step, ordered along training (init first)."""
    pairs = df[["stage", "step"]].drop_duplicates("stage")
    ordered = sorted(zip(pairs["stage"].astype(str), pairs["step"].astype(int)),
                     key=lambda p: (p[1], stage_order(p[0])))
    return {stage: step for stage, step in ordered}


def _step_limits(*step_sets: Iterable[float]) -> tuple[float, float]:
    """One x range from every step drawn, so figures of the same run share their step axis."""
    values = [float(s) for steps in step_sets for s in steps if pd.notna(s) and np.isfinite(float(s))]
    lo, hi = (min(0.0, min(values)), max(values)) if values else (0.0, 1.0)
    pad = 0.03 * max(hi - lo, 1.0)
    return lo - pad, hi + pad


def _depth_colormap(layers: Sequence[int]) -> tuple[matplotlib.colors.Colormap, matplotlib.colors.Normalize]:
    """Discrete viridis over the layer indices: dark = shallow, yellow = deep."""
    from matplotlib.colors import BoundaryNorm

    layers = sorted(layers) or [0]
    cmap = matplotlib.colormaps["viridis"].resampled(max(2, len(layers)))
    bounds = np.arange(len(layers) + 1, dtype=float) - 0.5
    return cmap, BoundaryNorm(bounds, cmap.N)


def _loss_panel(ax: Axes, log: pd.DataFrame, analysed_steps: Sequence[int]) -> None:
    log = log.sort_values("step")
    tr = log[["step", "train_loss"]].dropna()
    va = log[["step", "val_loss"]].dropna()
    for step in analysed_steps:
        ax.axvline(step, **_ANALYSED_STYLE)
    handles: list[object] = []
    labels: list[str] = []
    if not tr.empty:
        (h,) = ax.plot(tr["step"], tr["train_loss"], color="0.15", lw=1.2, marker=".", ms=4)
        handles.append(h)
        labels.append("train loss (mean since the previous log row)")
    if not va.empty:
        (h,) = ax.plot(va["step"], va["val_loss"], color="tab:red", marker="o", ms=3)
        handles.append(h)
        labels.append("validation loss")
    if not handles:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes, color="tab:red")
    if len(analysed_steps):
        handles.append(Line2D([], [], **_ANALYSED_STYLE))
        labels.append("checkpoint whose geometry is measured")
    ax.legend(handles, labels, fontsize=7, loc="upper right", framealpha=0.85)
    ax.set_ylabel("loss (nats/token)", fontsize=8)
    ax.set_title("cross-entropy loss", fontsize=10)
    ax.grid(alpha=0.3)


def _undefined_layers(sub: pd.DataFrame, names: dict[int, str]) -> list[str]:
    finite = sub.groupby("layer")["mean"].apply(lambda v: bool(np.isfinite(v.to_numpy(float)).any()))
    return [names.get(int(layer), str(layer)) for layer, ok in finite.items() if not ok]


def _figure_metrics_by_step(summary: pd.DataFrame, title: str, data_label: str, train_log: pd.DataFrame | None,
                            metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    stage_steps = _stage_steps(summary)
    names = layer_names(summary)
    layers = sorted(names)
    cmap, norm = _depth_colormap(layers)
    color_of = {layer: cmap(norm(i)) for i, layer in enumerate(layers)}
    n_panels = len(metrics) + (train_log is not None)
    ncols = 3 if n_panels > 4 else n_panels
    nrows = math.ceil(n_panels / ncols)
    fig = _new_figure(4.3 * ncols + 1.2, 3.0 * nrows + 1.4)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    flat = list(axes.flat)
    limits = _step_limits(stage_steps.values(), [] if train_log is None else train_log["step"])
    panel = 0
    if train_log is not None:
        _loss_panel(flat[0], train_log, sorted(stage_steps.values()))
        panel = 1
    counts = summary["n_prompts"] if "n_prompts" in summary.columns else pd.Series(dtype=float)
    n_prompts = _fmt_range(counts[counts > 0])  # 0 where a metric is undefined (layer 0)
    for metric in metrics:
        ax = flat[panel]
        panel += 1
        ax.set_title(_metric_short(metric), fontsize=10)
        sub = summary[summary["metric"] == metric]
        if sub.empty:  # not _no_data: clearing the x ticks would clear every shared axis
            ax.text(0.5, 0.5, _esc(f"no data for {metric}"), ha="center", va="center", transform=ax.transAxes,
                    fontsize=10, color="tab:red")
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
        undefined = _undefined_layers(sub, names)
        if undefined:
            ax.text(0.98, 0.02, "not defined at " + ", ".join(map(_esc, undefined)), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=7, color="0.35")
        values = sub["mean"].to_numpy(float)
        label = metric_label(metric)
        ax.set_ylabel(_maybe_log_y(ax, values, label) if "norm" in metric else label, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in flat[panel:]:
        ax.remove()
    used = flat[:panel]
    for col in range(ncols):
        column = [ax for i, ax in enumerate(used) if i % ncols == col]
        if column:
            column[-1].xaxis.set_tick_params(labelbottom=True)
            column[-1].set_xlabel(STEP_AXIS_LABEL, fontsize=8)
    flat[0].set_xlim(*limits)
    metric_axes = used[1:] if train_log is not None else used
    if layers and metric_axes:
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        bar = fig.colorbar(sm, ax=metric_axes, ticks=list(range(len(layers))), shrink=0.9, aspect=30)
        bar.ax.set_yticklabels([_esc(names[layer]) for layer in layers], fontsize=8)
        bar.set_label("layer (line colour = depth)", fontsize=9)
    steps_txt = ", ".join(str(s) for s in stage_steps.values())
    fig.legend([Line2D([], [], color="0.4", marker="o", ms=3)],
               [f"one line per layer: mean over {n_prompts} prompts at each analysed step ({steps_txt}); "
                "all panels share the step axis"],
               loc="outside lower center", fontsize=8)
    _title(fig, f"{title}: geometry across training", data_label)
    return fig


def plot_metrics_by_step(summary: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                         train_log: pd.DataFrame | None = None,
                         metrics: Sequence[str] = EVOLUTION_METRICS) -> Path:
    """Each geometry metric against the training step, one line per layer (colour = depth).

    Shows *when* during training the geometry forms and whether it tracks the loss: with
    ``train_log`` (``train_log.csv``) the top-left panel is the loss on the same step axis,
    dotted lines marking the analysed checkpoints. ``summary`` is an evolution ``summary.csv``
    (stages ``init``, ``step{N}``; x = its ``step`` column). Lines are prompt means; the
    prompt spread is left out here to keep eight layers readable.
    """
    return _save(_figure_metrics_by_step(summary, title, data_label, train_log, metrics), out_path)


def _load_similarity(npz_path: Path | str, prompt: int) -> tuple[dict[tuple[str, int], np.ndarray],
                                                                  list[str] | None, dict[int, str]]:
    """(stage, layer) -> cosine matrix of one prompt, its tokens, and the layer names stored with them."""
    with np.load(npz_path, allow_pickle=False) as npz:
        mats: dict[tuple[str, int], np.ndarray] = {}
        for key in npz.files:
            m = _NPZ_KEY.match(key)
            if m and int(m["prompt"]) == prompt:
                mats[(m["stage"], int(m["layer"]))] = np.asarray(npz[key], dtype=float)
        names = dict(enumerate(str(n) for n in npz["layer_names"])) if "layer_names" in npz.files else {}
        tok_key = f"tokens/prompt{prompt}"
        tokens = [str(t) for t in npz[tok_key]] if tok_key in npz.files else None
    return mats, tokens, names


def _stage_step_text(stage: str) -> str:
    if stage == "init":
        return "init, step 0"
    m = re.fullmatch(r"step(\d+)", stage)
    return f"step {m[1]}" if m else stage


def _figure_heatmaps_before_after(npz_path: Path | str, title: str, data_label: str, before: str,
                                  after: str | None, prompt: int, max_tick_labels: int) -> Figure:
    mats, tokens, names = _load_similarity(npz_path, prompt)
    if not mats:
        raise ValueError(f"{npz_path}: no similarity matrices for prompt {prompt}")
    stages = sorted({k[0] for k in mats}, key=stage_order)
    after = after or stages[-1]
    for stage in (before, after):
        if stage not in stages:
            raise ValueError(f"{npz_path}: stage {stage!r} not stored; stored stages: {stages}")
    layers = sorted({k[1] for k in mats if k[0] in (before, after)})
    T = next(iter(mats.values())).shape[0]
    if tokens is not None and len(tokens) != T:
        tokens = None  # never label rows with the wrong tokens
    every = max(1, math.ceil(T / max(1, max_tick_labels)))
    ticks = list(range(0, T, every))
    tick_labels = [_token_label(tokens[i]) for i in ticks] if tokens else [str(i) for i in ticks]
    axis_name = ("token" if tokens else "token position") + (f" (1 in {every} labelled)" if every > 1 else "")
    fontsize = 8 if len(ticks) <= 12 else (6 if len(ticks) <= 24 else 4.5)

    diffs = {layer: mats[(after, layer)] - mats[(before, layer)] for layer in layers
             if (before, layer) in mats and (after, layer) in mats}
    biggest = max((float(np.nanmax(np.abs(d))) for d in diffs.values()), default=0.0)
    dlim = max(0.1, math.ceil(biggest * 10) / 10)
    rows = [(f"before ({_stage_step_text(before)})", before), (f"after ({_stage_step_text(after)})", after),
            ("change: after − before", None)]
    fig = _new_figure(2.6 * len(layers) + 1.6, 2.6 * len(rows) + 1.2)
    axes = fig.subplots(len(rows), len(layers), squeeze=False)
    im = im_diff = None
    for r, (row_title, stage) in enumerate(rows):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            name = names.get(layer, f"layer {layer}")
            ax.set_title(f"{row_title}\n{_esc(name)}", fontsize=8)
            if stage is None:
                mat = diffs.get(layer)
                if mat is not None:
                    im_diff = ax.imshow(mat, cmap="PuOr_r", vmin=-dlim, vmax=dlim, interpolation="nearest")
            else:
                mat = mats.get((stage, layer))
                if mat is not None:
                    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
            if mat is None:
                _no_data(ax, "not stored")
                continue
            _label_heatmap_axes(ax, ticks, tick_labels, axis_name, fontsize,
                                bottom=r == len(rows) - 1, left=c == 0)
    if im is not None:
        fig.colorbar(im, ax=axes[:2, :], shrink=0.8, label="cosine similarity (unitless), range [−1, 1]")
    if im_diff is not None:
        fig.colorbar(im_diff, ax=axes[2:, :], shrink=0.8, label=f"Δ cosine (after − before), range ±{dlim:.1f}")
    fig.suptitle(f"{_esc(title)}\n{_esc(data_label)}\n"
                 f"pairwise token cosine similarity before and after training, prompt {prompt} ({T} tokens)",
                 fontsize=10)
    return fig


def plot_heatmaps_before_after(npz_path: Path | str, out_path: Path | str, title: str, data_label: str,
                               before: str = "init", after: str | None = None, prompt: int = 0,
                               max_tick_labels: int = 40) -> Path:
    """Token×token cosine matrices at the stored layers: before, after, and their difference.

    ``after`` defaults to the last stage in the npz (by training step). Before/after share
    the fixed [−1, 1] colour range; the difference row has its own symmetric range (stated
    on its colour bar) so small changes stay visible.
    """
    fig = _figure_heatmaps_before_after(npz_path, title, data_label, before, after, prompt, max_tick_labels)
    return _save(fig, out_path)


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

    fig = _new_figure(11.0, 4.4)
    ax_abs, ax_diff = fig.subplots(1, 2)
    for stage, frame, style_key in ((before, b, "init"), (after, a, "trained")):
        style = STAGE_STYLE[style_key]
        x = frame.columns.to_numpy(float)
        m = frame.mean(axis=0).to_numpy(float)
        sd = frame.std(axis=0, ddof=1).to_numpy(float)
        ax_abs.plot(x, m, marker="o", ms=3, label=f"{'before' if stage == before else 'after'}: "
                    f"{_stage_step_text(stage)}", **style)
        ax_abs.fill_between(x, m - sd, m + sd, color=style["color"], alpha=BAND_ALPHA, linewidth=0)
    handles, labels = ax_abs.get_legend_handles_labels()
    if n_prompts >= 2:
        handles.append(Patch(color="0.6", alpha=0.5))
        labels.append(f"shaded: ±1 s.d. across {n_prompts} prompts")
    else:
        handles.append(Patch(color="none"))
        labels.append("1 prompt: no spread to show")
    ax_abs.legend(handles, labels, fontsize=8)
    ax_abs.set_ylabel(metric_label(metric), fontsize=9)
    ax_abs.set_title(f"{_metric_short(metric)} before and after", fontsize=10)
    _setup_layer_axis(ax_abs, names)
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
    _setup_layer_axis(ax_diff, names)
    ax_diff.grid(alpha=0.3)
    _title(fig, f"{title}: change of {_metric_short(metric)} with training", data_label)
    return fig


def plot_similarity_change(metrics_df: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                           before: str = "init", after: str | None = None,
                           metric: str = "mean_cosine") -> Path:
    """Per layer, how training changed the mean pairwise cosine (after − before, paired by prompt).

    ``metrics_df`` is a per-prompt geometry ``metrics.csv``; ``after`` defaults to the last
    stage by training step. Left: both stages with ±1 s.d. bands; right: the per-prompt
    differences (dots), their mean and ±1 s.d. across prompts.
    """
    return _save(_figure_similarity_change(metrics_df, title, data_label, before, after, metric), out_path)


def _figure_loss_by_step(log: pd.DataFrame, title: str, data_label: str, analysed_steps: Sequence[int]) -> Figure:
    fig = _new_figure(10.0, 4.4)
    ax = fig.subplots()
    _loss_panel(ax, log, sorted(int(s) for s in analysed_steps))
    ax.set_xlim(*_step_limits(analysed_steps, log["step"]))
    ax.set_xlabel(STEP_AXIS_LABEL, fontsize=9)
    _title(fig, f"{title}\ntraining loss on the step axis of the geometry-evolution figures", data_label)
    return fig


def plot_loss_by_step(log: pd.DataFrame, out_path: Path | str, title: str, data_label: str,
                      analysed_steps: Sequence[int] = ()) -> Path:
    """Training and validation loss against the step, with the analysed checkpoints marked.

    Uses the same x range as :func:`plot_metrics_by_step` (union of logged and analysed steps),
    so a change in geometry can be read against the loss at the same step.
    """
    return _save(_figure_loss_by_step(log, title, data_label, list(analysed_steps)), out_path)
