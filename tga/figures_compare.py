"""Figures across variants and seeds: similarity by layer, A − B differences, perplexity.

They draw the comparison tables and never compute them: the A − B table comes from
:func:`tga.compare.compute_differences` (read back from ``difference.csv``), intervals
from :mod:`tga.stats`. A run whose training diverged is named in the subtitle
(:func:`diverged_note`), so a comparison never silently lacks it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tga.figure_style import (
    BAND_ALPHA,
    STAGE_STYLE,
    esc,
    figure_title,
    fmt_range,
    fmt_seeds,
    metric_label,
    metric_short,
    new_figure,
    no_data,
    save,
    setup_layer_axis,
    stage_step,
    variant_colors,
)
from tga.stats import CORRECTION_TEXT, INTERVAL_DESCRIPTION, mean_ci95
from tga.tables import STAGES, layer_names, load_summaries, parse_seed_values, per_seed_means, text_column

__all__ = [
    "diverged_note",
    "plot_differences",
    "plot_differences_table",
    "plot_perplexity",
    "plot_perplexity_table",
    "plot_similarity_by_layer",
    "plot_similarity_by_layer_files",
]


def diverged_note(data_label: str, diverged: Sequence[dict[str, Any]]) -> str:
    """The figure subtitle, extended with the runs that are missing because they diverged."""
    if not diverged:
        return data_label
    runs = ", ".join(f"{d['variant']} seed {d['seed']} (step {d['step']})" for d in diverged)
    return f"{data_label}\nmissing, training diverged: {runs}"


# ----------------------------------------------------------------------------- similarity by layer


def _figure_similarity_by_layer(summaries: pd.DataFrame, data_label: str, metric: str) -> Figure:
    per_seed = per_seed_means(summaries, metric)
    variants = sorted(per_seed["variant"].unique())
    colors = variant_colors(variants)
    fig = new_figure(11.0, 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    legend: dict[str, object] = {}
    name_sets = per_seed.groupby("layer")["layer_name"].nunique() if not per_seed.empty else pd.Series(dtype=int)
    consistent = bool((name_sets <= 1).all())
    # each variant drawn a little to the side of the layer, so no variant's interval or
    # seeds hide another's (a filled band of one noisy variant covered the others)
    dodge = dict(zip(variants, np.linspace(-0.2, 0.2, len(variants)) if len(variants) > 1 else [0.0]))
    for ax, stage in zip(axes, STAGES):
        ax.set_title(stage_step(per_seed, stage))
        sdf = per_seed[per_seed["stage"] == stage]
        if sdf.empty:
            no_data(ax, f"no {stage} data")
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
                label = f"{esc(variant)}: mean ± 95% CI over {len(seeds)} seeds"
            else:
                g = vdf.sort_values("layer")
                x = g["layer"].to_numpy(float)
                m = g["mean"].to_numpy(float)
                sd = g["std"].to_numpy(float)
                lo, hi = m - sd, m + sd
                n_p = fmt_range(g["n_prompts"]) if "n_prompts" in g.columns else "?"
                label = f"{esc(variant)}: seed {int(seeds[0])}, ±1 s.d. across {n_p} prompts"
            color = colors[variant]
            xs = x + dodge[variant]
            (line,) = ax.plot(xs, m, marker="o", ms=4, lw=1.5, color=color, label=label, zorder=3)
            ax.errorbar(xs, m, yerr=np.vstack([m - lo, hi - m]), fmt="none", ecolor=color, elinewidth=1.2,
                        capsize=2.5, zorder=2)
            if len(seeds) >= 2:  # the seeds themselves, not only their interval
                ax.plot(vdf["layer"].to_numpy(float) + dodge[variant], vdf["mean"].to_numpy(float),
                        linestyle="none", marker=".", ms=5, color=color, alpha=0.7, zorder=4)
            legend.setdefault(label, line)
        if consistent:
            setup_layer_axis(ax, layer_names(sdf))
            ax.set_xlim(ax.get_xlim()[0] - 0.1, ax.get_xlim()[1] + 0.1)
        else:
            ax.set_xlabel("layer index (0 = embedding; depth differs across variants)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric_label(metric))
    if legend:
        handles = [*legend.values(), Line2D([], [], linestyle="none", marker=".", ms=5, color="0.3")]
        labels = [*legend.keys(), "small dots: one seed's prompt mean"]
        fig.legend(handles, labels, loc="outside lower center", ncols=2 if len(labels) > 3 else len(labels))
    seeds_txt = fmt_seeds(per_seed["seed"]) if not per_seed.empty else "no data"
    figure_title(fig, f"{metric_short(metric)} by layer: {len(variants)} variants, {seeds_txt}", data_label)
    return fig


def plot_similarity_by_layer(summaries: pd.DataFrame, out_path: Path | str, data_label: str,
                             metric: str = "mean_cosine") -> Path:
    """All variants on one axis per stage (init and trained share the y axis), so
    architecture effects on a metric can be compared.

    ``summaries`` = concatenated summary.csv files plus ``variant`` and ``seed`` columns.
    ≥2 seeds: line = mean over seeds of per-seed prompt-means, error bar = 95% t-CI over
    seeds (the same t-interval as the difference table), small dots = the seeds.
    1 seed: line = prompt-mean, error bar = ±1 s.d. across prompts. The legend says which.
    Variants are drawn side by side at each layer, so none hides another.
    """
    return save(_figure_similarity_by_layer(summaries, data_label, metric), out_path)


def plot_similarity_by_layer_files(
    summary_paths: Sequence[str | Path],
    labels: Sequence[dict[str, Any]],
    out_png: str | Path,
    data_label: str,
    diverged: Sequence[dict[str, Any]] = (),
) -> Path:
    """:func:`plot_similarity_by_layer` from every model's ``summary.csv`` (the workflow's form)."""
    return plot_similarity_by_layer(load_summaries(summary_paths, labels), out_png, diverged_note(data_label, diverged))


# ----------------------------------------------------------------------------- differences


#: Where each stage's points sit beside the layer's tick, so init and trained never overlap.
STAGE_OFFSET = {"init": -0.17, "trained": 0.17}
#: How far past the points an interval may push a metric's axis, as a share of the points' span:
#: with 3 seeds t(2) = 4.3 makes intervals several times the seeds' spread, and an axis
#: stretched to the widest of them would flatten every point (they are clipped and marked instead).
INTERVAL_OVERHANG = 0.5
#: Colour of the layers a norm sets, and of the rows identical by construction.
CONSTRUCTION_GREY = "0.55"
NORM_SHADE = "0.9"


def _method_text(g: pd.DataFrame) -> str:
    """How one comparison's intervals were formed (layers without data, e.g. update_norm at 0, ignored)."""
    g = g[~g["method"].isin(["no-data", "missing"])]
    methods = set(g["method"])
    if methods == {"paired"}:
        return f"paired, {fmt_range(g['n_seeds'])} seeds"
    if "welch" in methods:
        return f"Welch, {fmt_range(g['n_a'])} vs {fmt_range(g['n_b'])} seeds"
    return "1 seed: no interval"


def _family_text(df: pd.DataFrame) -> str:
    """How many tests each correction family held (one family = one comparison and stage)."""
    if "n_tests" not in df.columns:
        return "the layer × metric tests of each comparison and stage"
    sizes = pd.to_numeric(df["n_tests"], errors="coerce").dropna()
    sizes = sizes[sizes > 0]
    counts = fmt_range(sizes.astype(int)) if not sizes.empty else "0"
    return f"the {counts} layer × metric tests of each comparison and stage"


def _panel_values(g: pd.DataFrame) -> np.ndarray:
    """Every mean and per-seed difference a panel draws (what its axis must show)."""
    values = list(g["mean_diff"].astype(float))
    for cell in text_column(g, "seed_differences"):
        values += list(parse_seed_values(cell).values())
    return np.asarray(values, dtype=float)


def _metric_limits(df: pd.DataFrame, metric: str) -> tuple[float, float] | None:
    """One y range per metric, shared by every comparison: the points and zero, and the
    intervals as far as :data:`INTERVAL_OVERHANG` allows."""
    g = df[df["metric"] == metric]
    points = np.append(_panel_values(g), 0.0)
    points = points[np.isfinite(points)]
    if points.size == 0:
        return None
    lo, hi = float(points.min()), float(points.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    ci_lo, ci_hi = g["ci_low"].astype(float).to_numpy(), g["ci_high"].astype(float).to_numpy()
    if np.isfinite(ci_lo).any():
        lo = max(min(lo, float(np.nanmin(ci_lo))), lo - INTERVAL_OVERHANG * span)
        hi = min(max(hi, float(np.nanmax(ci_hi))), hi + INTERVAL_OVERHANG * span)
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _difference_panel(ax: Axes, g: pd.DataFrame, limits: tuple[float, float]) -> dict[str, bool]:
    """A − B of one comparison and metric per layer, init and trained: each seed a dot, the
    mean a dash, the interval a thin bar (clipped at ``limits`` and marked there), a star
    where significant, a grey column where a norm sets the value, a hollow grey circle
    where A and B are identical by construction. Returns which marks it drew."""
    drawn = {"ci": False, "seeds": False, "clipped": False, "norm": False, "identical": False, "star": False}
    ax.axhline(0.0, color="black", lw=0.8, zorder=1)
    construction = text_column(g, "construction")
    for layer in sorted(g.loc[construction == "norm", "layer"].astype(int).unique()):
        ax.axvspan(layer - 0.45, layer + 0.45, color=NORM_SHADE, zorder=0, linewidth=0)
        drawn["norm"] = True
    low, high = limits
    for stage in STAGES:
        s = g[g["stage"] == stage].sort_values("layer")
        if s.empty:
            continue
        style = STAGE_STYLE[stage]
        color = style["color"]
        x = s["layer"].to_numpy(dtype=float) + STAGE_OFFSET[stage]
        mean = s["mean_diff"].to_numpy(float)
        same = (text_column(s, "construction") == "identical").to_numpy()
        ax.plot(x, mean, color=color, linestyle=style["linestyle"], lw=0.8, alpha=0.6, zorder=2)
        for xi, cell in zip(x[~same], text_column(s, "seed_differences").to_numpy()[~same]):
            seeds = parse_seed_values(cell)
            if len(seeds) > 1 or (seeds and not np.isfinite(s["ci_low"].astype(float)).any()):
                jitter = np.linspace(-0.05, 0.05, len(seeds)) if len(seeds) > 1 else np.zeros(1)
                ax.plot(xi + jitter, list(seeds.values()), linestyle="none", marker="o", ms=2.8, color=color,
                        alpha=0.55, markeredgewidth=0, zorder=3)
                drawn["seeds"] = True
        lo, hi = s["ci_low"].to_numpy(float), s["ci_high"].to_numpy(float)
        has_ci = np.isfinite(lo) & np.isfinite(hi) & ~same
        if has_ci.any():
            drawn["ci"] = True
            ax.vlines(x[has_ci], np.clip(lo[has_ci], low, high), np.clip(hi[has_ci], low, high), color=color,
                      lw=1.0, zorder=3)
            for clipped, edge, marker in ((lo < low, low, "v"), (hi > high, high, "^")):
                clipped &= has_ci
                if clipped.any():
                    drawn["clipped"] = True
                    ax.plot(x[clipped], np.full(int(clipped.sum()), edge), linestyle="none", marker=marker, ms=4,
                            color=color, clip_on=False, zorder=4)
        ax.plot(x[~same], mean[~same], linestyle="none", marker="_", ms=9, markeredgewidth=1.8, color=color,
                zorder=4)
        if same.any():
            drawn["identical"] = True
            ax.plot(x[same], mean[same], linestyle="none", marker="o", ms=5, markerfacecolor="white",
                    markeredgecolor=CONSTRUCTION_GREY, zorder=4)
        star = s["significant"].astype(bool).to_numpy()
        if star.any():
            drawn["star"] = True
            ax.plot(x[star], mean[star], linestyle="none", marker="*", ms=10, color=color,
                    markeredgecolor="black", markeredgewidth=0.5, zorder=5)
    ax.set_ylim(low, high)
    ax.grid(axis="y", alpha=0.3)
    return drawn


def _difference_legend(fig: Figure, df: pd.DataFrame, drawn: dict[str, bool]) -> None:
    """The one place the figure states what its marks, its interval and its test are."""
    entries: list[tuple[object, str]] = [
        (Line2D([], [], marker="_", ms=9, markeredgewidth=1.8, **STAGE_STYLE[s]),
         f"{s}: mean A − B over seeds ({'dashed' if s == 'init' else 'solid'} line)") for s in STAGES
    ]
    entries.append((Line2D([], [], color="black", lw=0.8), "zero (no difference)"))
    if drawn["seeds"]:
        entries.append((Line2D([], [], linestyle="none", marker="o", ms=3, color="0.4", alpha=0.7),
                        "dot: one seed's A − B"))
    if drawn["ci"]:
        entries.append((Line2D([], [], color="0.3", lw=1.0), f"bar: {INTERVAL_DESCRIPTION}"))
        entries.append((Line2D([], [], linestyle="none", marker="*", ms=10, color="0.5", markeredgecolor="black"),
                        f"star: t-test significant after {CORRECTION_TEXT} over {_family_text(df)}"))
    if drawn["clipped"]:
        entries.append((Line2D([], [], linestyle="none", marker="^", ms=4, color="0.3"),
                        "▲▼: the bar continues past the panel (difference.csv has it whole)"))
    if drawn["norm"]:
        entries.append((Patch(color=NORM_SHADE),
                        "grey column: a norm sets this value, by construction (construction_note in difference.csv)"))
    if drawn["identical"]:
        entries.append((Line2D([], [], linestyle="none", marker="o", ms=5, markerfacecolor="white",
                               markeredgecolor=CONSTRUCTION_GREY),
                        "hollow grey circle: A = B at every seed, by construction (not a test)"))
    # Two columns of entries wrapped at 72 characters: the legend never runs past the figure's
    # edges (a single line of the star's entry did at the quick config's width).
    fig.legend([h for h, _ in entries], [textwrap.fill(t, 72) for _, t in entries], loc="outside lower center",
               ncols=2, fontsize=8)


def _figure_differences(diff_df: pd.DataFrame, data_label: str, metrics: Sequence[str]) -> Figure:
    metrics = list(metrics)
    df = diff_df.copy()
    df["missing"] = text_column(df, "missing")
    comps = list(dict.fromkeys(zip(df["comparison"], df["a"], df["b"])))
    n_rows = max(1, len(comps))
    fig = new_figure(4.2 * len(metrics), 2.4 * n_rows + 1.6)
    axes = fig.subplots(n_rows, len(metrics), squeeze=False)
    if not comps:
        for ax in axes[0]:
            no_data(ax, "no comparisons")
    drawable = df[df["stage"].isin(STAGES) & df["layer"].notna() & (df["missing"] == "")]
    limits = {metric: _metric_limits(drawable, metric) for metric in metrics}
    names_per_row = [layer_names(drawable[drawable["comparison"] == comp]) for comp, _, _ in comps]
    shared_layers = len({tuple(sorted(n.items())) for n in names_per_row if n}) <= 1
    drawn: dict[str, bool] = {}
    lowest_drawn: dict[int, int] = {}  # column -> the lowest row with data, which carries the layer names
    for r, (comp, a, b) in enumerate(comps):
        cdf = df[df["comparison"] == comp]
        missing = ", ".join(dict.fromkeys(m for m in cdf["missing"] if m))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            if r == 0:
                ax.set_title(textwrap.fill(f"Δ {metric_label(metric)}", 42), fontsize=9)
            if c == 0:  # the row's one label: the comparison, and how its seeds were matched
                ax.set_ylabel(f"{esc(a)}\n− {esc(b)}" + ("" if missing else f"\n({_method_text(cdf)})"), fontsize=9)
            if missing:
                no_data(ax, f"missing: {missing}")
                continue
            g = drawable[(drawable["comparison"] == comp) & (drawable["metric"] == metric)]
            if g.empty or limits[metric] is None:
                no_data(ax, f"no data for {metric}")
                continue
            for key, value in _difference_panel(ax, g, limits[metric]).items():
                drawn[key] = drawn.get(key, False) or value
            setup_layer_axis(ax, names_per_row[r], xlabel="" if shared_layers else "layer")
            lowest_drawn[c] = r
    if shared_layers:  # one set of layer names per column, under its lowest panel
        for r, row in enumerate(axes):
            for c, ax in enumerate(row):
                if c in lowest_drawn and r < lowest_drawn[c]:
                    ax.tick_params(labelbottom=False)
                elif c in lowest_drawn and r == lowest_drawn[c]:
                    ax.set_xlabel("layer")
    _difference_legend(fig, df, {key: drawn.get(key, False) for key in
                                 ("ci", "seeds", "clipped", "norm", "identical", "star")})
    seeds_note = ""
    if "method" in df.columns and (df["method"] == "single-seed").all():
        seeds_note = " (single seed: no uncertainty estimate)"
    figure_title(fig, f"Architecture differences A − B by layer, one axis per metric{seeds_note}", data_label)
    return fig


def plot_differences(diff_df: pd.DataFrame, out_path: Path | str, data_label: str,
                     metrics: Sequence[str] = ("mean_cosine", "token_norm", "update_norm")) -> Path:
    """Grid of A − B per layer (rows = comparisons, columns = metrics, one y axis per
    metric) from ``tga.compare.compute_differences``: each seed's difference a dot, the
    mean a dash, the 95% interval a thin bar.

    Stars mark layers whose difference is significant after the Benjamini–Hochberg
    correction (``significant`` in the table); a grey column marks a value a norm sets
    and a hollow grey circle a row identical in A and B by construction (``construction``);
    a comparison with a variant lacking data shows 'missing: <variant>' instead of vanishing.
    """
    return save(_figure_differences(diff_df, data_label, metrics), out_path)


def plot_differences_table(csv_path: str | Path, out_png: str | Path, data_label: str,
                           diverged: Sequence[dict[str, Any]] = ()) -> Path:
    """:func:`plot_differences` from ``difference.csv``, the table rule's output."""
    return plot_differences(pd.read_csv(csv_path), out_png, diverged_note(data_label, diverged))


# ----------------------------------------------------------------------------- perplexity


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
    ax.set_xticklabels([f"{esc(v)}\n(n={k})" for v, k in zip(variants, counts)], rotation=30, ha="right",
                       fontsize=8)
    ax.set_xlabel("variant (n = seeds)")
    ax.set_ylim(0, ymax * 1.2 if ymax > 0 else 1.0)  # from zero: bar heights stay proportional
    ax.grid(axis="y", alpha=0.3)


def _figure_perplexity(ppl: pd.DataFrame, data_label: str) -> Figure:
    variants = list(dict.fromkeys(ppl["variant"]))
    colors = variant_colors(variants)
    fig = new_figure(max(9.0, 1.6 * len(variants) + 3.0), 4.8)
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
    text = f"{split} perplexity by variant ({fmt_seeds(ppl['seed'])})" if "seed" in ppl.columns \
        else f"{split} perplexity by variant"
    if "tokenizer" in ppl.columns and ppl["tokenizer"].nunique() > 1:
        text += "; tokenizers differ, so compare bits/byte, not token perplexity"
    figure_title(fig, text, data_label)
    return fig


def plot_perplexity(ppl: pd.DataFrame, out_path: Path | str, data_label: str) -> Path:
    """Held-out token perplexity and bits/byte per variant: bars = mean over seeds, 95% CI, seed dots.

    ``ppl`` is ``outputs/compare/perplexity.csv`` (variant, seed, token_ppl, bits_per_byte, ...).
    Bars start at zero so relative differences are not exaggerated.
    """
    return save(_figure_perplexity(ppl, data_label), out_path)


def plot_perplexity_table(csv_path: str | Path, out_png: str | Path, data_label: str) -> Path:
    """:func:`plot_perplexity` from ``perplexity.csv``, the table rule's output."""
    return plot_perplexity(pd.read_csv(csv_path), out_png, data_label)
