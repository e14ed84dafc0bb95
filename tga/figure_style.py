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
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator, NullFormatter  # noqa: E402

from tga.atomic import atomic_write  # noqa: E402
from tga.figure_files import figure_paths  # noqa: E402

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
#: No text in a figure is smaller than this (points): 7 pt is the usual floor of a journal
#: figure at print size. :func:`text_layout_problems` checks it.
MIN_FONT_SIZE = 7.0
#: The Gaussian noise floor of a TwoNN value (the null columns of summary.csv), drawn
#: alike wherever a figure shows TwoNN.
FLOOR_STYLE = {"color": "tab:purple", "linestyle": ":", "lw": 1.4}
FLOOR_LABEL = "isotropic Gaussian of the same N and d (noise floor; band: 95%)"
#: Base sizes (points) for every tga figure, set once here rather than per call.
FONT_SIZES = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
              "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8, "figure.titlesize": 11}
matplotlib.rcParams.update({**FONT_SIZES, "svg.hashsalt": "tga"})  # fixed salt: SVG ids, hence files, reproducible
#: Words of a prompt a heatmap shows: at 7-8 pt every row is then labelled in a 2.9-inch panel.
HEATMAP_WORDS = 16

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


def wrap_to_width(text: str, inches: float, fontsize: float) -> str:
    """``text`` with each line wrapped to ``inches`` (an average glyph is taken as 0.55 em
    wide), so a long title or data label stays inside its figure or panel."""
    import textwrap

    width = max(20, int(inches * 72 * 0.95 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) or line for line in text.split("\n"))


def wrap_to_figure(fig: Figure, text: str, fontsize: float) -> str:
    """``text`` wrapped to the figure's width (see :func:`wrap_to_width`)."""
    return wrap_to_width(text, fig.get_figwidth(), fontsize)


def suptitle(fig: Figure, text: str, fontsize: float = 11) -> None:
    """The figure's title, wrapped to its width; ``text`` is already escaped."""
    fig.suptitle(wrap_to_figure(fig, text, fontsize), fontsize=fontsize)


def figure_title(fig: Figure, text: str, data_label: str) -> None:
    """Title plus the data-provenance subtitle on its own line."""
    suptitle(fig, f"{esc(text)}\n{esc(data_label)}")


def stage_step(df: pd.DataFrame, stage: str) -> str:
    """'trained (step 500)': the stage name with the training step(s) it stands for."""
    if "step" not in df.columns:
        return stage
    steps = df.loc[df["stage"] == stage, "step"].dropna().unique()
    return f"{stage} (step {fmt_range(steps)})" if len(steps) else stage


# ----------------------------------------------------------------------------- figures and axes


def new_figure(width: float, height: float) -> Figure:
    """Built without pyplot: no global state, nothing to close."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, out_path: Path | str | Sequence[Path | str]) -> Path:
    """Write to every path in ``out_path`` (see :func:`figure_paths`), atomically and with
    deterministic metadata so reruns are byte-identical; returns the first path."""
    paths = figure_paths(out_path)
    metadata = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
        "svg": {"Date": None, "Creator": None},
    }
    try:
        for path in paths:
            fmt = path.suffix.lstrip(".").lower()
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata[fmt]))
        return paths[0]
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


def token_ticks(n_tokens: int, tokens: list[str] | None, max_tick_labels: int, unit: str = "token") -> TokenTicks:
    """Every k-th token labelled (at most ``max_tick_labels``); positions when the tokens are
    unknown or do not match the matrix, never rows labelled with the wrong tokens. Labels
    are never below :data:`MIN_FONT_SIZE`: callers cap ``max_tick_labels`` to what fits."""
    if tokens is not None and len(tokens) != n_tokens:
        tokens = None
    every = max(1, math.ceil(n_tokens / max(1, max_tick_labels)))
    positions = list(range(0, n_tokens, every))
    labels = [token_label(tokens[i]) for i in positions] if tokens else [str(i) for i in positions]
    axis_name = (unit if tokens else f"{unit} position") + (f" (1 in {every} labelled)" if every > 1 else "")
    fontsize = 8 if len(positions) <= 12 else MIN_FONT_SIZE
    return TokenTicks(positions, labels, axis_name, fontsize)


def word_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, stop)`` token ranges of the prompt's words: a word starts at a token
    that begins with whitespace or follows one that ends with it (GPT-2's ' the', the
    character tokenizer's ' '); whitespace-only tokens belong to no word."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate(tokens):
        if not token.strip():
            if start is not None:
                spans.append((start, i))
            start = None
            continue
        if start is not None and (token[0].isspace() or tokens[i - 1][-1].isspace()):
            spans.append((start, i))
            start = None
        if start is None:
            start = i
    if start is not None:
        spans.append((start, len(tokens)))
    return spans


def word_matrix(mat: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Word × word mean of a token × token cosine matrix: cell (a, b) is the mean cosine
    between the tokens of word a and those of word b; on the diagonal, between a word's
    own distinct tokens (blank, NaN, for a one-token word: its 1 says nothing)."""
    out = np.full((len(spans), len(spans)), np.nan)
    for a, (a0, a1) in enumerate(spans):
        for b, (b0, b1) in enumerate(spans):
            block = np.asarray(mat[a0:a1, b0:b1], dtype=float)
            if a == b:
                block = block[~np.eye(a1 - a0, dtype=bool)]
            finite = block[np.isfinite(block)]
            if finite.size:
                out[a, b] = float(finite.mean())
    return out


class SimilarityView(NamedTuple):
    """What a heatmap figure draws of one prompt: the matrices (by key), the raw text of
    their rows (words or tokens; None: positions), the row unit and a sentence saying
    what a cell is."""

    matrices: dict
    labels: list[str] | None
    unit: str
    description: str

    def ticks(self, max_tick_labels: int) -> TokenTicks:
        n = next(iter(self.matrices.values())).shape[0]
        return token_ticks(n, self.labels, max_tick_labels, self.unit)


def similarity_view(mats: dict, tokens: list[str] | None, max_words: int) -> SimilarityView:
    """Readable heatmaps of one prompt: word × word (see :func:`word_matrix`) over its first
    ``max_words`` words when the tokens are known, so every row is labelled with a whole
    word at a readable size; token positions otherwise (every k-th labelled)."""
    n_tokens = next(iter(mats.values())).shape[0]
    if tokens is None or len(tokens) != n_tokens:
        return SimilarityView(mats, None, "token", f"token × token, {n_tokens} token positions (tokens not stored)")
    spans = word_spans(tokens)
    if not spans:
        return SimilarityView(mats, None, "token", f"token × token, {n_tokens} tokens (all whitespace)")
    shown = spans[:max_words]
    labels = ["".join(tokens[a:b]).strip() for a, b in shown]
    span_text = f"its first {len(shown)} of {len(spans)} words" if len(shown) < len(spans) else f"its {len(shown)} words"
    if all(b - a == 1 for a, b in shown):
        idx = [a for a, _ in shown]
        views = {key: np.asarray(m, dtype=float)[np.ix_(idx, idx)] for key, m in mats.items()}
        return SimilarityView(views, labels, "token", f"token × token over {span_text} (one token each)")
    views = {key: word_matrix(m, shown) for key, m in mats.items()}
    return SimilarityView(views, labels, "word", f"word × word over {span_text} ({n_tokens} tokens): mean cosine between "
                                         "the tokens of two words; diagonal: within a word")


def centred_change(after: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, float]:
    """``(after − its mean) − (before − its mean)`` over the off-diagonal cells, and the mean
    shift ``mean(after) − mean(before)`` removed: training often raises every cosine by
    about the same amount (anisotropy), which would hide where the structure changed."""
    off = ~np.eye(after.shape[0], dtype=bool)

    def mean(m: np.ndarray) -> float:
        cells = m[off & np.isfinite(m)]
        return float(cells.mean()) if cells.size else 0.0

    shift = mean(after) - mean(before)
    return (after - before) - shift, shift


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


# ----------------------------------------------------------------------------- axes scales


def train_loss_steps(log: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``train_log.csv``'s train loss as a step line (draw with ``drawstyle="steps-pre"``):
    a row's value is the mean over the steps since the previous row, so it is drawn flat
    over that window, starting at the previous row's step, not as a value at one step."""
    log = log.sort_values("step")
    steps = log["step"].to_numpy(float)
    loss = log["train_loss"].to_numpy(float)
    ok = np.flatnonzero(np.isfinite(loss))
    if not ok.size:
        return np.array([]), np.array([])
    start = steps[ok[0] - 1] if ok[0] > 0 else 0.0
    return np.concatenate([[start], steps[ok]]), np.concatenate([[loss[ok[0]]], loss[ok]])


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks get a label, written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_ticks(ax: Axes, axis: str = "y", one_two_five: bool = False) -> None:
    """Log-scale tick labels as plain numbers ('60' and '0.1', not '6×10¹' or '1e-01');
    minor ticks labelled only while the axis spans about a decade, where the major
    ticks alone are too few. ``one_two_five`` puts the labelled ticks at 1-2-5 steps
    instead, for panels compared side by side, where matplotlib's choice would differ
    from panel to panel."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    if one_two_five:
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())
        return
    target.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    target.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def log_step_axis(ax: Axes, max_step: float) -> None:
    """Training step on a log axis that still shows step 0 (initialization): linear
    below step 1, logarithmic above (symlog), so early checkpoints, where the geometry
    changes most, are spread out instead of crowded at the left edge."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("symlog", linthresh=1.0, linscale=0.4)
    ax.set_xlim(-0.15, max(2.0, float(max_step)) * 1.25)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # '100', not '10²'



# ----------------------------------------------------------------------------- text layout check


def _text_polygon(text: Text, renderer) -> np.ndarray:
    """The four corners (pixels) of a text's rotated box: its window extent is the
    axis-aligned box around them, which for a 45° label is far larger than the text."""
    box = text.get_window_extent(renderer)
    angle = math.radians(text.get_rotation() % 180.0)
    if abs(math.sin(angle)) < 1e-6 or abs(math.cos(angle)) < 1e-6:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    rotation = text.get_rotation()
    text.set_rotation(0.0)
    flat = text.get_window_extent(renderer)
    text.set_rotation(rotation)
    w, h = flat.width / 2, flat.height / 2
    c, s = math.cos(angle), math.sin(angle)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    return corners @ np.array([[c, s], [-s, c]]) + [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]


def _overlap(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Whether two convex polygons overlap by more than ``tolerance`` pixels (separating axes)."""
    for poly in (a, b):
        for i in range(len(poly)):
            edge = poly[(i + 1) % len(poly)] - poly[i]
            normal = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1.0)
            pa, pb = a @ normal, b @ normal
            if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= tolerance:
                return False
    return True


def _drawn_texts(fig: Figure) -> list[Text]:
    """Every text the figure draws: visible, non-empty, and for tick labels only those
    whose tick lies inside the axis' view (matplotlib keeps the others, undrawn)."""
    hidden: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * max(hi - lo, 1e-300)
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                loc = tick.get_loc()
                drawn = ax.axison and tick.get_visible() and loc is not None and lo - slack <= loc <= hi + slack
                if not drawn:
                    hidden.update({id(tick.label1), id(tick.label2)})
    return [text for text in fig.findobj(match=Text)
            if id(text) not in hidden and text.get_text().strip() and text.get_visible()
            and text.get_alpha() != 0 and (text.axes is None or text.axes.get_visible())]


def text_layout_problems(fig: Figure, min_size: float = MIN_FONT_SIZE, tolerance: float = 0.5) -> list[str]:
    """Why a figure's text is not readable whole, as one line per problem: a text smaller
    than ``min_size`` points, a text whose box leaves the figure, or two texts whose
    (rotated) boxes overlap by more than ``tolerance`` pixels. Empty for a good figure.
    Draws the figure (without rendering pixels) first, so the layout is the saved one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the renderer savefig uses, at the saved resolution
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    texts = _drawn_texts(fig)
    problems: list[str] = []
    polygons = []
    for text in texts:
        label = repr(text.get_text()[:40])
        if text.get_fontsize() < min_size - 1e-9:
            problems.append(f"{label} is {text.get_fontsize():.1f} pt, below {min_size:g} pt")
        poly = _text_polygon(text, renderer)
        polygons.append(poly)
        if (poly[:, 0].min() < page.x0 - tolerance or poly[:, 0].max() > page.x1 + tolerance
                or poly[:, 1].min() < page.y0 - tolerance or poly[:, 1].max() > page.y1 + tolerance):
            problems.append(f"{label} leaves the figure")
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if _overlap(polygons[i], polygons[j], tolerance):
                problems.append(f"{texts[i].get_text()[:40]!r} overlaps {texts[j].get_text()[:40]!r}")
    return problems
