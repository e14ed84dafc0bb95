"""Tests for the figure modules: files are real, readable PNGs; statistics match hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import AxesImage
from PIL import Image

from tga import figures_compare, figures_evolution, figures_model
from tga.compare import compute_differences
from tga.figure_style import METRIC_LABELS, heatmap_panel, new_figure, token_ticks
from tga.figures_compare import plot_differences, plot_perplexity, plot_similarity_by_layer
from tga.figures_model import plot_geometry_layers, plot_similarity_heatmaps, plot_training_curves

DATA_LABEL = "trained on wiki.valid.raw, evaluated on wiki.test.raw"
LAYER_NAMES = ["embedding", "block1", "block2", "final_norm"]
METRICS = ["mean_cosine", "token_norm", "update_norm"]


# ----------------------------------------------------------------------------- builders


def make_summary(seed: int = 0, offset: float = 0.0, metrics=METRICS) -> pd.DataFrame:
    """summary.csv for one model: stage,step,layer,layer_name,metric,mean,std,n_prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for stage, step in (("init", 0), ("trained", 500)):
        for layer, name in enumerate(LAYER_NAMES):
            for metric in metrics:
                if metric == "update_norm" and layer == 0:
                    mean, std = math.nan, math.nan
                else:
                    mean = offset + 0.1 * layer + (0.3 if stage == "trained" else 0.0) + rng.normal(0, 0.01)
                    mean = mean * (20 if metric == "token_norm" else 1)
                    std = 0.05
                rows.append(dict(stage=stage, step=step, layer=layer, layer_name=name, metric=metric,
                                 mean=mean, std=std, n_prompts=4))
    return pd.DataFrame(rows)


def make_summaries(spec: dict[str, list[int]]) -> pd.DataFrame:
    parts = []
    for i, (variant, seeds) in enumerate(spec.items()):
        for seed in seeds:
            parts.append(make_summary(seed, offset=0.2 * i).assign(variant=variant, seed=seed))
    return pd.concat(parts, ignore_index=True)


def make_log(n: int = 50) -> pd.DataFrame:
    steps = np.arange(n) * 10
    loss = 5.0 * np.exp(-steps / 200) + 1.5
    val = np.where(steps % 100 == 0, loss + 0.1, np.nan)
    return pd.DataFrame(dict(step=steps, lr=np.minimum(1, (steps + 1) / 50) * 3e-4, train_loss=loss,
                             val_loss=val, val_ppl=np.exp(val), tokens_per_s=1e4, elapsed_s=steps * 0.1))


def make_npz(path: Path, T: int = 12, layers=(0, 1, 3)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for stage in ("init", "trained"):
        for j in layers:
            for i in range(2):
                x = rng.normal(size=(T, 8))
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                arrays[f"{stage}/layer{j}/prompt{i}"] = (x @ x.T).astype(np.float32)
    toks = [" the", "$", "\n", "cat$$x", "a"] * T
    for i in range(2):
        arrays[f"tokens/prompt{i}"] = np.array(toks[:T], dtype=np.str_)
    np.savez(path, **arrays)
    return path


def assert_png(path: Path, min_w: int = 400, min_h: int = 250) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w >= min_w and h >= min_h and w < 10_000 and h < 10_000
    assert not list(path.parent.glob(".*.tmp")), "temp file left behind"
    return w, h


def figure_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text"))]


def heatmap_of(ax) -> AxesImage | None:
    """The heatmap image drawn on ``ax``, if any; colour bars are no heatmaps."""
    if ax.get_label() == "<colorbar>":
        return None
    return next((image for image in ax.images if isinstance(image, AxesImage)), None)



# ----------------------------------------------------------------------------- figures


def test_metric_labels_have_units_for_all_metrics():
    from tga.metrics import METRIC_NAMES

    for m in METRIC_NAMES:
        assert m in METRIC_LABELS
    assert "(unitless)" in METRIC_LABELS["mean_cosine"] and "L2 norm" in METRIC_LABELS["token_norm"]


def test_plot_geometry_layers(tmp_path):
    summary = make_summary()
    out = plot_geometry_layers(summary, tmp_path / "g" / "geometry_layers.png", "preln_rmsnorm_swiglu, seed 0",
                               DATA_LABEL, metrics=(*METRICS, "effective_rank"))
    w, h = assert_png(out)
    assert w > h
    fig = figures_model._figure_geometry_layers(summary, "v, seed 0", DATA_LABEL, METRICS)
    texts = figure_texts(fig)
    assert any(DATA_LABEL in t for t in texts)
    assert any("±1 s.d. across 4 prompts" in t for t in texts)
    assert [ax.get_ylabel() for ax in fig.axes][0] == METRIC_LABELS["mean_cosine"]
    assert all(ax.get_xlabel() == "layer" for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == LAYER_NAMES
    # an absent metric gets a visible 'no data' panel, not a silent gap
    assert any("no data for effective_rank" in t for t in figure_texts(
        figures_model._figure_geometry_layers(summary, "v", DATA_LABEL, ["effective_rank"])))


def test_plot_similarity_heatmaps(tmp_path):
    npz = make_npz(tmp_path / "similarity.npz", T=12)
    out = plot_similarity_heatmaps(npz, tmp_path / "h.png", "v, seed 0", DATA_LABEL, prompt=1,
                                   layer_names={0: "embedding", 1: "block1", 3: "final_norm"})
    assert_png(out)
    fig = figures_model._figure_similarity_heatmaps(npz, "v", DATA_LABEL, 0, 40, None)
    heatmap_axes = [ax for ax in fig.axes if heatmap_of(ax) is not None]
    assert len(heatmap_axes) == 6  # 2 stages x 3 stored layers
    assert all(heatmap_of(ax).get_clim() == (-1.0, 1.0) for ax in heatmap_axes)
    with np.load(npz) as stored:  # the cells are the stored matrix, row 0 at the top
        assert np.allclose(heatmap_of(heatmap_axes[0]).get_array().reshape(12, 12), stored["init/layer0/prompt0"])
    assert heatmap_axes[0].yaxis_inverted()
    colorbar_labels = [ax.get_ylabel() for ax in fig.axes if heatmap_of(ax) is None]
    assert any("cosine similarity" in lbl for lbl in colorbar_labels)
    labels = [t.get_text() for t in heatmap_axes[0].get_yticklabels()]
    assert labels[:3] == ["␣the", r"\$", "↵"]  # whitespace visible, '$' escaped from mathtext
    assert list(heatmap_axes[0].get_yticks()[:3]) == [0, 1, 2]  # labels on the cell centres (cell i spans i ± 0.5)
    # long prompts: every k-th token labelled, at most max_tick_labels
    fig_long = figures_model._figure_similarity_heatmaps(make_npz(tmp_path / "long.npz", T=100), "v", DATA_LABEL, 0, 20,
                                                         None)
    ax0 = [ax for ax in fig_long.axes if heatmap_of(ax) is not None][0]
    assert 1 < len(ax0.get_yticks()) <= 20


def test_heatmap_panel_blanks_nan_cells_and_keeps_the_symmetric_range():
    """An undefined similarity (NaN) must be a blank cell, never a colour that reads as a
    value; the colour range is ±limit whatever the data's own range."""
    mat = np.array([[1.0, np.nan, 0.2], [np.nan, 1.0, -0.3], [0.2, -0.3, 1.0]])
    ax = new_figure(3, 3).subplots()
    image = heatmap_panel(ax, mat, "RdBu_r", 0.5, token_ticks(3, None, 40), bottom=True, left=True)
    shown = image.get_array()
    assert np.ma.is_masked(shown) and shown.mask.tolist() == np.isnan(mat).tolist()
    assert np.allclose(shown.filled(np.nan), mat, equal_nan=True)
    assert image.get_clim() == (-0.5, 0.5)
    assert image.cmap.get_bad()[3] == 0.0  # the masked cells are transparent


def test_plot_similarity_heatmaps_rejects_wrong_prompt(tmp_path):
    npz = make_npz(tmp_path / "similarity.npz")
    with pytest.raises(ValueError):
        plot_similarity_heatmaps(npz, tmp_path / "h.png", "v", DATA_LABEL, prompt=7)


def test_plot_training_curves(tmp_path):
    assert_png(plot_training_curves(make_log(), tmp_path / "training_curves.png", "v, seed 0", DATA_LABEL))
    fig = figures_model._figure_training_curves(make_log(), "v, seed 0", DATA_LABEL)
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert "loss (nats/token)" in ylabels and fig.axes[1].get_yscale() == "log"
    assert all(ax.get_xlabel() == "training step" for ax in fig.axes)


def test_plot_similarity_by_layer_seed_bands(tmp_path):
    summaries = make_summaries({"preln": [0, 1, 2], "postln": [0]})
    assert_png(plot_similarity_by_layer(summaries, tmp_path / "sim.png", DATA_LABEL))
    texts = figure_texts(figures_compare._figure_similarity_by_layer(summaries, DATA_LABEL, "mean_cosine"))
    assert any("preln: mean ± 95% CI over 3 seeds" in t for t in texts)
    assert any("postln: seed 0, ±1 s.d. across 4 prompts" in t for t in texts)
    # the line is the mean over seeds of per-seed means
    fig = figures_compare._figure_similarity_by_layer(summaries, DATA_LABEL, "mean_cosine")
    line = next(l for l in fig.axes[1].get_lines() if "preln:" in l.get_label())
    per_seed = summaries.query("variant == 'preln' and stage == 'trained' and metric == 'mean_cosine'")
    assert line.get_ydata() == pytest.approx(per_seed.groupby("layer")["mean"].mean().to_numpy())


ARCHITECTURES = {"A": {"norm_position": "pre", "norm": "rmsnorm"}, "B": {"norm_position": "post", "norm": "rmsnorm"},
                 "C": {"norm_position": "pre", "norm": "rmsnorm"}, "D": {"norm_position": "post", "norm": "rmsnorm"}}


def noisy_summaries(spec: dict[str, list[int]], identical_init_embedding: bool = False) -> pd.DataFrame:
    """make_summaries with each variant's own noise (so A − B varies by seed); optionally
    B's embedding at init a copy of A's, as the same seed gives tga's variants."""
    summaries = make_summaries(spec)
    rng = np.random.default_rng(11)
    summaries["mean"] += rng.normal(0, 0.02, len(summaries)) * np.where(summaries["metric"] == "token_norm", 20, 1)
    if identical_init_embedding:
        key = ["seed", "stage", "layer", "metric"]
        a = summaries[summaries["variant"] == "A"].set_index(key)["mean"]
        copy = (summaries["variant"] == "B") & (summaries["stage"] == "init") & (summaries["layer"] == 0)
        summaries.loc[copy, "mean"] = [a[k] for k in summaries.loc[copy, key].itertuples(index=False)]
    return summaries


def test_plot_differences_with_missing_variant(tmp_path):
    summaries = make_summaries({"A": [0, 1, 2], "B": [0, 1, 2]})
    diff = compute_differences(summaries, [("A", "B"), ("A", "failed_variant")], METRICS)
    out = plot_differences(diff, tmp_path / "difference.png", DATA_LABEL)
    assert_png(out)
    fig = figures_compare._figure_differences(diff, DATA_LABEL, METRICS)
    texts = figure_texts(fig)
    assert sum("missing: failed_variant" in t for t in texts) == len(METRICS)
    # One label per row (the comparison and its method), one title per column (the metric).
    assert sum(t == "A\n− B\n(paired, 3 seeds)" for t in texts) == 1
    assert sum(t == "A\n− failed_variant" for t in texts) == 1
    assert not any(ax.texts for ax in fig.axes[:len(METRICS)])  # no per-panel method boxes (row A − B has data)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == len(METRICS) and all(t.startswith("Δ ") for t in titles)
    # also works from the CSV round trip (missing becomes NaN / empty, layer float)
    diff.to_csv(tmp_path / "difference.csv", index=False)
    again = pd.read_csv(tmp_path / "difference.csv")
    assert_png(plot_differences(again, tmp_path / "difference2.png", DATA_LABEL))


def test_plot_differences_shares_one_axis_per_metric_and_draws_each_seed():
    summaries = noisy_summaries({"A": [0, 1, 2], "B": [0, 1, 2], "C": [0, 1, 2]})
    diff = compute_differences(summaries, [("A", "B"), ("A", "C")], METRICS)
    fig = figures_compare._figure_differences(diff, DATA_LABEL, METRICS)
    grid = np.array(fig.axes).reshape(2, len(METRICS))
    for column in grid.T:
        assert column[0].get_ylim() == column[1].get_ylim()
    assert grid[0][0].get_ylim() != grid[0][1].get_ylim()  # metrics keep their own scales
    # Layer names once per column, under its lowest panel.
    assert not any(t.get_text() for t in grid[0][0].get_xticklabels())
    assert [t.get_text() for t in grid[1][0].get_xticklabels()] == LAYER_NAMES
    # Every seed's A − B is a dot: the dots of one panel are exactly the table's per-seed values.
    from tga.tables import parse_seed_values

    cell = diff[(diff["comparison"] == "A - B") & (diff["metric"] == "mean_cosine")]
    expected = sorted(v for c in cell["seed_differences"] for v in parse_seed_values(c).values())
    dots = sorted(y for line in grid[0][0].get_lines() if line.get_marker() == "o" for y in line.get_ydata())
    assert dots == pytest.approx(expected)
    # The interval is a thin bar per layer and stage, not a band.
    bars = [c for c in grid[0][0].collections if c.__class__.__name__ == "LineCollection"]
    assert sum(len(b.get_segments()) for b in bars) == int(cell["ci_low"].notna().sum())
    assert not [c for c in grid[0][0].collections if c.__class__.__name__ == "FillBetweenPolyCollection"]


def test_plot_differences_marks_by_construction_rows():
    summaries = noisy_summaries({"A": [0, 1, 2], "B": [0, 1, 2]}, identical_init_embedding=True)
    diff = compute_differences(summaries, [("A", "B")], METRICS, ARCHITECTURES)
    fig = figures_compare._figure_differences(diff, DATA_LABEL, METRICS)
    cosine, norm = fig.axes[0], fig.axes[1]
    hollow = [line for line in cosine.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "white"]
    identical = diff[(diff["metric"] == "mean_cosine") & (diff["construction"] == "identical")]
    assert len(identical) == 1 and sum(len(line.get_xdata()) for line in hollow) == 1
    # token_norm: the grey columns stand on the layers a norm sets (B's blocks, both final norms).
    shaded = sorted(round(float(np.mean(p.get_x() + p.get_width() / 2))) for p in norm.patches)
    labelled = diff[(diff["metric"] == "token_norm") & (diff["construction"] == "norm")]["layer"]
    assert shaded == sorted(labelled.unique().tolist()) == [1, 2, 3]
    assert not cosine.patches  # no norm sets a cosine
    texts = figure_texts(fig)
    assert any("a norm sets this value, by construction" in t for t in texts)
    assert any("A = B at every seed, by construction (not a test)" in t for t in texts)
    # Without by-construction rows the legend does not list them.
    plain = figure_texts(figures_compare._figure_differences(compute_differences(
        noisy_summaries({"A": [0, 1, 2], "B": [0, 1, 2]}), [("A", "B")], METRICS), DATA_LABEL, METRICS))
    assert not any("by construction" in t for t in plain)


def test_plot_differences_clips_a_wide_interval_and_marks_it():
    summaries = noisy_summaries({"A": [0, 1, 2], "B": [0, 1, 2]})
    diff = compute_differences(summaries, [("A", "B")], ["mean_cosine"])
    wide = diff.index[diff["stage"] == "trained"][1]
    diff.loc[wide, ["ci_low", "ci_high"]] = [-50.0, 50.0]
    fig = figures_compare._figure_differences(diff, DATA_LABEL, ["mean_cosine"])
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high - low < 10  # the points, not the wide bar, set the axis
    ends = [line for line in ax.get_lines() if line.get_marker() in ("^", "v")]
    assert sorted(line.get_marker() for line in ends) == ["^", "v"]
    assert any("the bar continues past the panel" in t for t in figure_texts(fig))


def test_plot_differences_stars_only_corrected_significant_layers():
    summaries = make_summaries({"A": [0, 1, 2], "B": [0, 1, 2]})  # A is offset by -0.2 from B
    diff = compute_differences(summaries, [("B", "A")], ["mean_cosine"])
    # One layer whose raw p-value is below 0.05 but whose adjusted one is not: no star there.
    borderline = diff.index[(diff["stage"] == "trained")][0]
    diff.loc[borderline, ["p_value", "p_adjusted", "significant"]] = [0.03, 0.09, False]
    fig = figures_compare._figure_differences(diff, DATA_LABEL, ["mean_cosine"])
    stars = [l for l in fig.axes[0].get_lines() if l.get_marker() == "*"]
    starred = sum(len(l.get_xdata()) for l in stars)
    assert starred == int(diff["significant"].sum())
    assert starred < int((diff["p_value"] < 0.05).sum())
    texts = figure_texts(fig)
    assert any("significant after Benjamini–Hochberg (FDR 5%)" in t and "layer × metric tests" in t for t in texts)


def test_plot_differences_legend_stays_inside_the_figure():
    """The legend is what says which interval, test and correction the figure uses and
    what the by-construction marks mean: it must be readable whole, not run past the
    figure's edges (three legend columns did at this width)."""
    summaries = noisy_summaries({"A": [0, 1, 2], "B": [0, 1, 2], "C": [0, 1, 2], "D": [0, 1, 2]},
                                identical_init_embedding=True)
    diff = compute_differences(summaries, [("A", "B"), ("C", "D"), ("A", "C"), ("B", "D")], METRICS, ARCHITECTURES)
    wide = diff.index[diff["stage"] == "trained"][1]
    diff.loc[wide, ["ci_low", "ci_high"]] = [-50.0, 50.0]  # the clipped-bar entry too: every entry at once
    fig = figures_compare._figure_differences(diff, DATA_LABEL, METRICS)
    fig.draw_without_rendering()
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 9
    box, page = legend.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0


def test_plot_perplexity(tmp_path):
    ppl = pd.DataFrame(dict(variant=["a", "a", "a", "b"], seed=[0, 1, 2, 0], token_ppl=[30.0, 32.0, 31.0, 40.0],
                            bits_per_byte=[1.5, 1.6, 1.55, 1.8], word_ppl=[90.0, 95, 93, 120],
                            split="test", tokenizer="char"))
    assert_png(plot_perplexity(ppl, tmp_path / "perplexity.png", DATA_LABEL))
    fig = figures_compare._figure_perplexity(ppl, DATA_LABEL)
    texts = figure_texts(fig)
    half = 4.303 * 1.0 / math.sqrt(3)
    assert f"31.00\n±{half:.2f}" in texts and "40.00" in texts
    assert fig.axes[0].get_ylim()[0] == 0


def test_reruns_are_byte_identical(tmp_path):
    summaries = make_summaries({"A": [0, 1], "B": [0, 1]})
    p1 = plot_similarity_by_layer(summaries, tmp_path / "one.png", DATA_LABEL)
    p2 = plot_similarity_by_layer(summaries, tmp_path / "two.png", DATA_LABEL)
    b1 = p1.read_bytes()
    assert b1 == p2.read_bytes()
    assert b"matplotlib" not in b1.lower()  # no Software/version metadata
    plot_similarity_by_layer(summaries, p1, DATA_LABEL)  # overwrite in place, atomically
    assert p1.read_bytes() == b1
