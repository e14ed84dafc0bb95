"""What every tga figure shares: labels with units, colours, titles, heatmap panels, saving.

Every figure states what it shows: axis labels carry units (``METRIC_LABELS``), the
title names the variant(s) and seed(s), a subtitle carries the caller's ``data_label``
(what was trained on / evaluated on), and every shaded band or error bar says in the
legend what it is. The figure modules (:mod:`tga.figures_model`,
:mod:`tga.figures_compare`, :mod:`tga.figures_evolution`) build on these helpers, so
a change here reruns every figure and a change to one of them reruns only its own.

Output is deterministic (Agg backend, no timestamps or software version in the
metadata) and written through :func:`tga.atomic.atomic_write`, so Snakemake never sees
a half-written figure and reruns on the same data are byte-identical.

Seaborn is imported inside the one function that draws with it
(:func:`tga.figures_evolution.plot_similarity_change`), not at the top: with the
scipy.stats it pulls in it costs about 1 s of CPU per import, and every figure is its
own Snakemake job, so the figures that do not use it should not pay for it. The heatmaps
are matplotlib images, not ``seaborn.heatmap``'s mesh of N² cells: the same picture,
without that import and several times cheaper to render.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tga.atomic import atomic_write  # noqa: E402

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
    "twonn_pooled": "TwoNN over all prompts' tokens, Facco fit (dimensions)",
    "twonn_mle_pooled": "TwoNN over all prompts' tokens, MLE (dimensions)",
    "knn_overlap": "k-NN overlap fraction (unitless)",
    "mean_logit_freq_corr": "Pearson r, mean-vector logits vs log train frequency (unitless)",
}

#: Stage styling shared by all per-model and difference figures.
STAGE_STYLE: dict[str, dict[str, str]] = {
    "init": {"color": "tab:orange", "linestyle": "--"},
    "trained": {"color": "tab:blue", "linestyle": "-"},
}

DPI = 120
BAND_ALPHA = 0.2
#: Colour maps of the heatmaps: cosine in [−1, 1], and a change of cosine.
COSINE_CMAP = "RdBu_r"
CHANGE_CMAP = "PuOr_r"


# ----------------------------------------------------------------------------- text


def metric_label(metric: str) -> str:
    """Axis label for a metric; unknown metrics fall back to their raw name (visible, not hidden)."""
    return METRIC_LABELS.get(metric, metric)


def metric_short(metric: str) -> str:
    """Label without the trailing '(units)' part, for panel titles."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", metric_label(metric))


def esc(text: object) -> str:
    """Escape '$' so user strings (variants, tokens, labels) are never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def token_label(token: str, max_len: int = 12) -> str:
    """Make whitespace visible and keep tick labels short; a bare ' the' must not look like 'the'."""
    s = str(token).replace("\n", "↵").replace("\t", "→").replace("\r", "")
    s = s.replace(" ", "␣")
    if len(s) > max_len:
        s = s[: max_len - 1] + "…"
    return esc(s) if s else "∅"


def fmt_seeds(seeds: Iterable[object]) -> str:
    vals = sorted({int(s) for s in seeds})
    if not vals:
        return "seeds: none"
    return f"seed {vals[0]}" if len(vals) == 1 else "seeds " + ", ".join(map(str, vals))


def fmt_range(values: Iterable[object]) -> str:
    """'3' or '2–4': how many prompts/seeds a statistic is over, when that can vary."""
    vals = sorted({int(v) for v in values if pd.notna(v)})
    if not vals:
        return "?"
    return str(vals[0]) if vals[0] == vals[-1] else f"{vals[0]}–{vals[-1]}"


def figure_title(fig: Figure, text: str, data_label: str) -> None:
    """Title plus the data-provenance subtitle on its own line."""
    fig.suptitle(f"{esc(text)}\n{esc(data_label)}", fontsize=11)


def stage_step(df: pd.DataFrame, stage: str) -> str:
    """'trained (step 500)': the stage name with the training step(s) it stands for."""
    if "step" not in df.columns:
        return stage
    steps = df.loc[df["stage"] == stage, "step"].dropna().unique()
    return f"{stage} (step {fmt_range(steps)})" if len(steps) else stage


# ----------------------------------------------------------------------------- figures and axes


def new_figure(width: float, height: float) -> Figure:
    """Built without pyplot: no global state, nothing to close."""
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, out_path: Path | str) -> Path:
    """Write atomically with deterministic metadata so reruns are byte-identical."""
    fmt = Path(out_path).suffix.lstrip(".").lower() or "png"
    metadata = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
        "svg": {"Date": None, "Creator": None},
    }.get(fmt)
    try:
        return atomic_write(out_path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata))
    finally:
        fig.clear()  # frees the artists


def setup_layer_axis(ax: Axes, names: dict[int, str], xlabel: str = "layer") -> None:
    """Layer index on x, ticks labelled with the layer names."""
    layers = sorted(names)
    ax.set_xticks(layers)
    ax.set_xticklabels([esc(names[l]) for l in layers], rotation=45 if len(layers) > 4 else 0,
                       ha="right" if len(layers) > 4 else "center", fontsize=8)
    ax.set_xlabel(xlabel)
    if layers:
        ax.set_xlim(layers[0] - 0.3, layers[-1] + 0.3)


def maybe_log_y(ax: Axes, values: np.ndarray, label: str) -> str:
    """Norms can span orders of magnitude across depth (Pre-LN growth); switch to log y then, and say so."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > 50:
        ax.set_yscale("log")
        return f"{label} [log scale]"
    return label


def no_data(ax: Axes, text: str) -> None:
    """A visible note in place of a panel whose data is absent, rather than a silent gap."""
    ax.text(0.5, 0.5, esc(text), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="tab:red")
    ax.set_xticks([])
    ax.set_yticks([])


def variant_colors(variants: Sequence[str]) -> dict[str, tuple]:
    """Colour by sorted name so a variant keeps its colour across figures."""
    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(sorted(variants))}


# ----------------------------------------------------------------------------- similarity heatmaps

_NPZ_KEY = re.compile(r"^(?P<stage>[^/]+)/layer(?P<layer>\d+)/prompt(?P<prompt>\d+)$")


def load_similarity(npz_path: Path | str, prompt: int) -> tuple[dict[tuple[str, int], np.ndarray],
                                                                 list[str] | None, dict[int, str]]:
    """(stage, layer) -> cosine matrix of one prompt, its tokens, and the layer names stored with them
    (a geometry or evolution ``similarity.npz``)."""
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


class TokenTicks(NamedTuple):
    """Which rows/columns of a token×token heatmap get a label, and how the axis is named."""

    positions: list[int]
    labels: list[str]
    axis_name: str
    fontsize: float


def token_ticks(n_tokens: int, tokens: list[str] | None, max_tick_labels: int) -> TokenTicks:
    """Every k-th token labelled (at most ``max_tick_labels``); positions when the tokens are
    unknown or do not match the matrix, never rows labelled with the wrong tokens."""
    if tokens is not None and len(tokens) != n_tokens:
        tokens = None
    every = max(1, math.ceil(n_tokens / max(1, max_tick_labels)))
    positions = list(range(0, n_tokens, every))
    labels = [token_label(tokens[i]) for i in positions] if tokens else [str(i) for i in positions]
    axis_name = ("token" if tokens else "token position") + (f" (1 in {every} labelled)" if every > 1 else "")
    fontsize = 8 if len(positions) <= 12 else (6 if len(positions) <= 24 else 4.5)
    return TokenTicks(positions, labels, axis_name, fontsize)


def heatmap_panel(ax: Axes, mat: np.ndarray, cmap: str, limit: float, ticks: TokenTicks,
                  bottom: bool, left: bool) -> AxesImage:
    """One token×token matrix with a symmetric colour range ±``limit``: row 0 at the top,
    square cells, NaN cells blank (masked, drawn in the colour map's transparent "bad"
    colour); token labels only on the outer edge of a grid. Returns the image for a
    colour bar shared by the panels of the same range."""
    image = ax.imshow(np.ma.masked_invalid(np.asarray(mat, dtype=float)), cmap=cmap, vmin=-limit, vmax=limit,
                      interpolation="nearest", aspect="equal")
    ax.set_xticks(ticks.positions, ticks.labels if bottom else [], rotation=90, fontsize=ticks.fontsize)
    ax.set_yticks(ticks.positions, ticks.labels if left else [], rotation=0, fontsize=ticks.fontsize)
    ax.set_xlabel(ticks.axis_name if bottom else "", fontsize=8)
    ax.set_ylabel(ticks.axis_name if left else "", fontsize=8)
    return image
