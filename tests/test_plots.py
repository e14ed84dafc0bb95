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
from tga.figure_files import figure_copies
from tga.figure_style import (
    METRIC_LABELS,
    centred_change,
    heatmap_panel,
    new_figure,
    text_layout_problems,
    token_ticks,
    word_matrix,
    word_spans,
)
from tga.figures_compare import plot_differences, plot_perplexity, plot_similarity_by_layer
from tga.figures_model import (
    MODEL_FIGURES,
    plot_geometry_layers,
    plot_model_figures,
    plot_similarity_heatmaps,
    plot_training_curves,
)

DATA_LABEL = "trained on wiki.valid.raw, evaluated on wiki.test.raw"
LAYER_NAMES = ["embedding", "block1", "block2", "final_norm"]
METRICS = ["mean_cosine", "token_norm", "update_norm"]


# ----------------------------------------------------------------------------- builders


def make_summary(seed: int = 0, offset: float = 0.0, metrics=METRICS, names=LAYER_NAMES) -> pd.DataFrame:
    """summary.csv for one model: stage,step,layer,layer_name,metric,mean,std,n_prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for stage, step in (("init", 0), ("trained", 500)):
        for layer, name in enumerate(names):
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


def make_summaries(spec: dict[str, list[int]], names=LAYER_NAMES) -> pd.DataFrame:
    parts = []
    for i, (variant, seeds) in enumerate(spec.items()):
        for seed in seeds:
            parts.append(make_summary(seed, offset=0.2 * i, names=names).assign(variant=variant, seed=seed))
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
    fig = figures_model._figure_similarity_heatmaps(npz, "v", DATA_LABEL, 0, 16, None)
    heatmap_axes = [ax for ax in fig.axes if heatmap_of(ax) is not None]
    assert len(heatmap_axes) == 6  # 2 stages x 3 stored layers
    assert all(heatmap_of(ax).get_clim() == (-1.0, 1.0) for ax in heatmap_axes)
    # rows are words: ' the' '$' | '\n' | 'cat$$x' 'a' | ' the' '$' | ...; cells are the stored
    # token matrix averaged over each pair of words, row 0 at the top
    spans = [(0, 2), (3, 5), (5, 7), (8, 10), (10, 12)]
    with np.load(npz) as stored:
        expected = word_matrix(stored["init/layer0/prompt0"], spans)
    shown = heatmap_of(heatmap_axes[0]).get_array().reshape(5, 5).filled(np.nan)
    assert np.allclose(shown, expected, equal_nan=True)
    assert heatmap_axes[0].yaxis_inverted()
    colorbar_labels = [ax.get_ylabel() for ax in fig.axes if heatmap_of(ax) is None]
    assert any("cosine similarity" in lbl for lbl in colorbar_labels)
    labels = [t.get_text() for t in heatmap_axes[0].get_yticklabels()]
    assert labels == [r"the\$", r"cat\$\$xa", r"the\$", r"cat\$\$xa", r"the\$"]  # '$' escaped from mathtext
    assert list(heatmap_axes[0].get_yticks()) == [0, 1, 2, 3, 4]  # labels on the cell centres
    assert heatmap_axes[0].get_ylabel() == "word"
    assert any("word × word over its 5 words (12 tokens)" in t for t in figure_texts(fig))
    # long prompts: only the first max_words words, each one labelled
    fig_long = figures_model._figure_similarity_heatmaps(make_npz(tmp_path / "long.npz", T=100), "v", DATA_LABEL, 0,
                                                         16, None)
    ax0 = [ax for ax in fig_long.axes if heatmap_of(ax) is not None][0]
    assert len(ax0.get_yticks()) == 16 and all(t.get_text() for t in ax0.get_yticklabels())
    assert any("its first 16 of 40 words" in t for t in figure_texts(fig_long))


def test_word_spans_follow_whitespace_for_both_tokenizers():
    chars = list("Homarus gammarus ,")
    assert word_spans(chars) == [(0, 7), (8, 16), (17, 18)]
    gpt2 = ["Hom", "arus", " gam", "marus", " ,", "\n", "It"]
    assert word_spans(gpt2) == [(0, 2), (2, 4), (4, 5), (6, 7)]  # a whitespace-only token ends a word
    assert word_spans([" ", "\n"]) == []


def test_word_matrix_averages_blocks_and_leaves_one_token_words_blank():
    mat = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    words = word_matrix(mat, [(0, 2), (2, 3)])
    assert words[0, 1] == pytest.approx((0.4 + 0.6) / 2) == words[1, 0]
    assert words[0, 0] == pytest.approx(0.2)  # between the word's own two tokens, not their self-similarity
    assert np.isnan(words[1, 1])


def test_centred_change_removes_the_uniform_shift_and_keeps_the_structure():
    rng = np.random.default_rng(0)
    before = rng.uniform(-0.2, 0.2, size=(6, 6))
    before = (before + before.T) / 2
    np.fill_diagonal(before, 1.0)
    after = before + 0.4  # every pair more similar: the anisotropy rise
    np.fill_diagonal(after, 1.0)
    after[1, 4] = after[4, 1] = after[1, 4] + 0.3  # one pair changed beyond it
    change, shift = centred_change(after, before)
    assert shift == pytest.approx(0.4 + 2 * 0.3 / 30)
    off = ~np.eye(6, dtype=bool)
    assert np.unravel_index(np.argmax(np.where(off, np.abs(change), 0)), change.shape) in [(1, 4), (4, 1)]
    assert np.abs(change[off]).max() == pytest.approx(0.3 - 0.02)
    # the plain difference (what the figure showed before) is dominated by the shift
    plain = after - before
    assert np.abs(plain[off]).min() > np.abs(change[off]).max()


def test_heatmaps_show_positions_when_the_tokens_are_not_stored(tmp_path):
    path = tmp_path / "no_tokens.npz"
    with np.load(make_npz(tmp_path / "s.npz", T=30)) as stored:
        np.savez(path, **{k: stored[k] for k in stored.files if not k.startswith("tokens/")})
    fig = figures_model._figure_similarity_heatmaps(path, "v", DATA_LABEL, 0, 16, None)
    ax0 = [ax for ax in fig.axes if heatmap_of(ax) is not None][0]
    assert heatmap_of(ax0).get_array().shape == (30, 30)
    assert ax0.get_ylabel() == "token position (1 in 2 labelled)"
    assert [t.get_text() for t in ax0.get_yticklabels()][:2] == ["0", "2"]


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


TRAINING = {"max_steps": 490, "warmup_steps": 30, "learning_rate": 3e-4, "min_lr_ratio": 0.1,
            "eval_interval": 10, "checkpoint_interval": 100}


def test_plot_training_curves(tmp_path):
    assert_png(plot_training_curves(make_log(), tmp_path / "training_curves.png", "v, seed 0", DATA_LABEL,
                                    training=TRAINING))
    fig = figures_model._figure_training_curves(make_log(), "v, seed 0", DATA_LABEL, TRAINING)
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert "loss (nats/token)" in ylabels and fig.axes[1].get_yscale() == "log"
    assert all(ax.get_xlabel() == "training step" for ax in fig.axes)
    # perplexity ticks read as plain numbers, not '6×10¹'
    fig.draw_without_rendering()
    ticks = [t.get_text() for t in [*fig.axes[1].get_yticklabels(), *fig.axes[1].get_yticklabels(minor=True)]]
    assert any(t for t in ticks) and not any("times" in t or "^" in t or "×" in t for t in ticks)
    # the train loss of a row covers the steps since the previous row: flat from 0 to 10 for the row at
    # 10 (the training loop's row 0 has no train loss)
    log = make_log()
    log.loc[0, "train_loss"] = math.nan
    fig = figures_model._figure_training_curves(log, "v, seed 0", DATA_LABEL, TRAINING)
    train = next(l for l in fig.axes[0].get_lines() if "log interval" in l.get_label())
    assert train.get_drawstyle() == "steps-pre" and list(train.get_xdata()[:2]) == [0, 10]


def test_model_figures_in_one_call_match_the_figures_drawn_one_by_one(tmp_path):
    """Rule model_figures draws the three figures of a model in one process: the same
    bytes as each drawn alone, every format of each written, and a missing or unknown
    figure name refused."""
    summary, npz, log = make_summary(), make_npz(tmp_path / "similarity.npz"), make_log()
    together = tmp_path / "together"
    out_paths = {name: [together / f"{name}.png", together / f"{name}.pdf"] for name in MODEL_FIGURES}
    written = plot_model_figures(summary, npz, log, out_paths, "v, seed 0", DATA_LABEL, training=TRAINING)
    assert written == {name: together / f"{name}.png" for name in MODEL_FIGURES}
    alone = {
        "geometry_layers": plot_geometry_layers(summary, tmp_path / "geometry_layers.png", "v, seed 0", DATA_LABEL),
        "similarity_heatmaps": plot_similarity_heatmaps(npz, tmp_path / "similarity_heatmaps.png", "v, seed 0",
                                                        DATA_LABEL),
        "training_curves": plot_training_curves(log, tmp_path / "training_curves.png", "v, seed 0", DATA_LABEL,
                                                training=TRAINING),
    }
    for name in MODEL_FIGURES:
        assert written[name].read_bytes() == alone[name].read_bytes(), name
        assert (together / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
    with pytest.raises(ValueError, match=r"given for \['geometry_layers', 'similarity_heatmaps'\]"):
        plot_model_figures(summary, npz, log, {name: out_paths[name] for name in MODEL_FIGURES[:2]}, "v", DATA_LABEL)


def test_training_curves_draw_the_schedule_of_the_training_loop(monkeypatch):
    """The learning-rate line is tga.train.learning_rate_at at every step, so a 30-step
    warmup peaks at step 30, not at the first log row after it (50 here)."""
    from tga import train
    from tga.schema import TrainConfig

    log = make_log().iloc[::5].reset_index(drop=True)  # a log row every 50 steps

    def lr_line(fig):
        return next(l for l in fig.axes[2].get_lines() if l.get_label().startswith("schedule"))

    line = lr_line(figures_model._figure_training_curves(log, "v", DATA_LABEL, TRAINING))
    x, y = line.get_xdata(), line.get_ydata()
    assert list(x) == list(range(1, 491))
    config = TrainConfig.from_dict(TRAINING)
    assert y == pytest.approx([train.learning_rate_at(n - 1, config) for n in range(1, 491)])
    assert x[int(np.argmax(y))] == 30
    # mutation: another schedule in the training loop shows up in the figure (it is called, not copied)
    monkeypatch.setattr(train, "learning_rate_at", lambda step, cfg: 1e-3)
    assert set(lr_line(figures_model._figure_training_curves(log, "v", DATA_LABEL, TRAINING)).get_ydata()) == {1e-3}
    # without the settings: the log's rows, and the legend says so
    fig = figures_model._figure_training_curves(log, "v", DATA_LABEL, None)
    assert any("at the log rows (settings not given)" in l.get_label() for l in fig.axes[2].get_lines())


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
    # the seeds themselves are drawn, beside the other variant's (never at the same x)
    color = line.get_color()
    dots = [l for l in fig.axes[1].get_lines() if l.get_marker() == "." and l.get_color() == color]
    assert len(dots) == 1 and sorted(dots[0].get_ydata()) == pytest.approx(sorted(per_seed["mean"]))
    other = next(l for l in fig.axes[1].get_lines() if "postln:" in l.get_label())
    assert not set(np.round(line.get_xdata(), 6)) & set(np.round(other.get_xdata(), 6))
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # init and trained compare


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
    # a cosine is the norm's only at final_norm (its gain): one grey column there
    assert [round(float(np.mean(p.get_x() + p.get_width() / 2))) for p in cosine.patches] == [3]
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


# ----------------------------------------------------------------------------- readable text, formats


def assert_text_readable(fig) -> None:
    """Every text of the figure inside it, none over another, none below the minimum size."""
    problems = text_layout_problems(fig)
    assert not problems, "\n".join(problems)


def test_text_layout_check_finds_each_kind_of_problem():
    def figure(*texts: dict):
        fig = new_figure(4.0, 3.0)
        ax = fig.subplots()
        ax.set(title="a title", xlabel="x", ylabel="y")
        for kw in texts:
            fig.text(**kw)
        return fig

    assert text_layout_problems(figure()) == []
    assert any("below 7 pt" in p for p in text_layout_problems(figure(dict(x=0.5, y=0.5, s="tiny", fontsize=5))))
    assert any("leaves the figure" in p for p in text_layout_problems(
        figure(dict(x=0.9, y=0.5, s="a label running off the right edge"))))
    assert any("overlaps" in p for p in text_layout_problems(
        figure(dict(x=0.5, y=0.5, s="first"), dict(x=0.52, y=0.51, s="second"))))
    # rotated labels are checked by their rotated boxes: side by side they pass although their
    # axis-aligned boxes overlap; pushed together they fail
    rotated = dict(rotation=45, ha="right", va="top", rotation_mode="anchor")
    assert text_layout_problems(figure(dict(x=0.3, y=0.5, s="a long rotated label", **rotated),
                                       dict(x=0.4, y=0.5, s="a long rotated label", **rotated))) == []
    assert any("overlaps" in p for p in text_layout_problems(
        figure(dict(x=0.3, y=0.5, s="a long rotated label", **rotated),
               dict(x=0.33, y=0.5, s="a long rotated label", **rotated))))
    # tick labels outside the view are not drawn, hence not checked
    fig = figure()
    fig.axes[0].set_xticks([-5, 0.5], ["hidden far away", "shown"])
    fig.axes[0].set_xlim(0, 1)
    assert text_layout_problems(fig) == []


EIGHT_LAYERS = ["embedding", *(f"block{i}" for i in range(1, 7)), "final_norm"]
LONG_VARIANTS = {"llama-preln-layernorm": [0, 1, 2], "llama-postln-layernorm": [0, 1, 2],
                 "standard-preln": [0, 1, 2], "standard-postln": [0]}


def _ppl_table() -> pd.DataFrame:
    rows = [dict(variant=v, seed=s, token_ppl=600.0 + 20 * i + s, bits_per_byte=2.0 + 0.05 * i, word_ppl=900.0,
                 split="test", tokenizer="gpt2") for i, (v, seeds) in enumerate(LONG_VARIANTS.items()) for s in seeds]
    return pd.DataFrame(rows)


FIGURES = {
    "training_curves": lambda tmp: figures_model._figure_training_curves(make_log(), "v, seed 0", DATA_LABEL,
                                                                        TRAINING),
    "training_curves_without_settings": lambda tmp: figures_model._figure_training_curves(
        make_log(), "v, seed 0", DATA_LABEL, None),
    "similarity_heatmaps_64_tokens": lambda tmp: figures_model._figure_similarity_heatmaps(
        make_npz(tmp / "s.npz", T=64), "llama-preln (seed 0): pre-LN, rmsnorm, swiglu, 6 layers x 384 dims",
        DATA_LABEL, 0, 16, None),
    "similarity_heatmaps_positions": lambda tmp: figures_model._figure_similarity_heatmaps(
        _without_tokens(make_npz(tmp / "s.npz", T=64)), "v", DATA_LABEL, 0, 16, None),
    "similarity_by_layer": lambda tmp: figures_compare._figure_similarity_by_layer(
        make_summaries(LONG_VARIANTS, EIGHT_LAYERS), DATA_LABEL, "mean_cosine"),
    "perplexity": lambda tmp: figures_compare._figure_perplexity(_ppl_table(), DATA_LABEL),
}


def _without_tokens(npz: Path) -> Path:
    with np.load(npz) as stored:
        kept = {k: stored[k] for k in stored.files if not k.startswith("tokens/")}
    np.savez(npz, **kept)
    return npz


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_text_is_inside_readable_and_not_overlapping(name, tmp_path):
    assert_text_readable(FIGURES[name](tmp_path))


def test_figures_are_written_in_every_requested_format_reproducibly(tmp_path):
    summaries = make_summaries({"A": [0, 1], "B": [0]})
    paths = [tmp_path / "f.png", tmp_path / "f.pdf", tmp_path / "f.svg"]
    first = plot_similarity_by_layer(summaries, paths, DATA_LABEL)
    assert first == paths[0]
    assert_png(paths[0])
    assert paths[1].read_bytes().startswith(b"%PDF") and b"<svg" in paths[2].read_bytes()[:2000]
    before = [p.read_bytes() for p in paths]
    plot_similarity_by_layer(summaries, paths, DATA_LABEL)
    assert [p.read_bytes() for p in paths] == before  # no dates, random ids or versions inside
    assert figure_copies("outputs/compare/perplexity.png", "pdf") == ["outputs/compare/perplexity.pdf"]
    assert figure_copies("outputs/compare/perplexity.png", "png") == []
    with pytest.raises(ValueError, match="figures.format 'jpg' is not one of png, pdf, svg"):
        figure_copies("a.png", "jpg")
    with pytest.raises(ValueError, match=r"f\.jpg: figure format 'jpg' is not one of"):
        plot_similarity_by_layer(summaries, tmp_path / "f.jpg", DATA_LABEL)
    assert not (tmp_path / "f.jpg").exists()


@pytest.mark.workflow  # runs Snakemake or fresh processes
def test_figures_format_makes_every_figure_rule_write_a_copy(tmp_path):
    """With figures.format: svg every figure the workflow plans is a PNG plus an SVG from
    the same job, and both are requested (a dry run, nothing trained)."""
    import re

    from test_workflow import TINY, make_workdir, snakemake

    workdir = make_workdir(tmp_path, {**TINY, "figures": {"format": "svg"}})
    out = snakemake(workdir, "--dry-run").stdout
    outputs = [line.split(":", 1)[1] for line in out.splitlines() if line.strip().startswith("output:")]
    pngs = [p.strip() for line in outputs for p in line.split(",") if p.strip().endswith(".png")]
    assert len(pngs) >= 9  # per-model, evolution and comparison figures
    for line in outputs:
        files = [p.strip() for p in line.split(",")]
        for png in (f for f in files if f.endswith(".png")):
            assert png[:-4] + ".svg" in files, line
    assert re.search(r"model_figures\s+\d", out)
    # and requested by rule all: Snakemake checks only a job's requested outputs, so an SVG
    # that only the rule declared would never be made beside an existing PNG
    requested = next(line for line in out.split("rule all:", 1)[1].splitlines() if line.strip().startswith("input:"))
    wanted = [p.strip() for p in requested.split(":", 1)[1].split(",")]
    assert {p[:-4] + ".svg" for p in wanted if p.endswith(".png")} <= set(wanted)
    assert "outputs/compare/similarity_by_layer.svg" in wanted
    (tmp_path / "png").mkdir()
    assert ".svg" not in snakemake(make_workdir(tmp_path / "png", TINY), "--dry-run").stdout
