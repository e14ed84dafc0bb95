"""Model evolution: stages from the training settings, the evolution figures, and the
evolution targets of the shared tiny study (tests/conftest.py) plus the HTML report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tga.evolution import analyze_evolution, evolution_stages, evolution_steps
from tga.geometry import CROSS_PROMPT, summarize_metrics
from tga.metrics import CROSS_PROMPT_METRICS, METRIC_NAMES, PROMPT_METRICS, GeometryError
from tga.model import ModelConfig, Transformer, save_checkpoint
from tga.schema import TrainConfigError
from matplotlib.text import Text

from tga import figures_evolution
from tga.figure_style import centred_change, text_layout_problems, word_matrix, word_spans
from tga.figures_evolution import EVOLUTION_FIGURES, plot_evolution_figures
from tga.plots import (
    plot_heatmaps_before_after,
    plot_metrics_by_step,
    plot_similarity_change,
)
from tga.tokenizers import CharTokenizer
from workflow_runs import make_study, planned_jobs, snakemake

DATA_LABEL = "synthetic evolution data"
TITLE = "toy (seed 0)"
LAYER_NAMES = ["embedding", "block1", "block2", "final_norm"]
STAGES = [("init", 0), ("step100", 100), ("step200", 200), ("step250", 250)]


# ----------------------------------------------------------------------------- builders


def make_metrics(n_prompts: int = 3, seed: int = 0) -> pd.DataFrame:
    """metrics.csv over the stages above: per-prompt rows (update_norm / knn_overlap NaN at
    layer 0) and the cross-prompt rows (prompt = CROSS_PROMPT; the frequency correlation
    at the final norm only), as tga.geometry writes them."""
    rng = np.random.default_rng(seed)
    rows = []
    for stage, step in STAGES:
        for layer, name in enumerate(LAYER_NAMES):
            for prompt in [*range(n_prompts), CROSS_PROMPT]:
                for metric in PROMPT_METRICS if prompt != CROSS_PROMPT else CROSS_PROMPT_METRICS:
                    if metric == "mean_logit_freq_corr" and layer != len(LAYER_NAMES) - 1:
                        continue
                    if metric in ("update_norm", "knn_overlap") and layer == 0:
                        value = math.nan
                    else:
                        value = 0.1 + 0.05 * layer + 0.002 * step + rng.normal(0, 0.02)
                        value *= 10 if "norm" in metric else 1
                    rows.append((stage, step, layer, name, prompt, 12, metric, value))
    return pd.DataFrame(rows, columns=["stage", "step", "layer", "layer_name", "prompt", "n_tokens", "metric", "value"])


def make_log() -> pd.DataFrame:
    steps = list(range(0, 251, 50))
    return pd.DataFrame({
        "step": steps, "lr": [1e-3] * len(steps),
        "train_loss": [math.nan] + [4.0 - 0.005 * s for s in steps[1:]],
        "val_loss": [4.3 - 0.005 * s for s in steps], "val_ppl": [math.exp(4.3 - 0.005 * s) for s in steps],
        "tokens_per_s": [math.nan] + [1000.0] * (len(steps) - 1), "elapsed_s": [float(s) for s in steps],
    })


def make_npz(path: Path, T: int = 10) -> Path:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {}
    for stage, _ in STAGES:
        for layer in (0, 3):
            x = rng.normal(size=(T, 6))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            arrays[f"{stage}/layer{layer}/prompt0"] = (x @ x.T).astype(np.float32)
    arrays["tokens/prompt0"] = np.array((list("The lobst$r ") * 4)[:T], dtype=np.str_)
    arrays["layer_names"] = np.array(LAYER_NAMES, dtype=np.str_)
    np.savez_compressed(path, **arrays)
    return path


def assert_png(path: Path, min_width: int = 300) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > min_width


# ----------------------------------------------------------------------------- stages


def test_stages_are_init_and_every_checkpoint_the_training_keeps():
    linear = {"max_steps": 400, "checkpoint_interval": 100, "checkpoint_spacing": "linear"}
    stages = evolution_stages(linear, "m")
    assert list(stages) == ["init", "step100", "step200", "step300", "step400"]
    assert stages["init"] == str(Path("m/init.pt"))
    assert stages["step300"] == str(Path("m/checkpoints/step000300.pt"))
    assert evolution_steps(linear) == [0, 100, 200, 300, 400]


def test_default_checkpoints_are_log_spaced_and_dense_early():
    """By default the kept checkpoints double (1, 2, 4, ...): as many early, where the
    geometry changes most, as late, and evenly spread on the figures' log step axis."""
    steps = evolution_steps({"max_steps": 300, "checkpoint_interval": 100, "warmup_steps": 30})
    assert steps == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300]  # 300 = final.pt closes the run
    assert evolution_stages({"max_steps": 300, "warmup_steps": 30}, "m")["step300"] == str(Path("m/final.pt"))
    assert evolution_steps({"max_steps": 256, "warmup_steps": 30})[-2:] == [128, 256]  # a power of two: no extra
    assert evolution_steps({"max_steps": 1, "warmup_steps": 1}) == [0, 1]
    assert steps == evolution_steps({"max_steps": 300, "checkpoint_interval": 100, "warmup_steps": 30})  # same again
    with pytest.raises(TrainConfigError, match=r"checkpoint_spacing='geometric' must be one of \['log', 'linear'\]"):
        evolution_steps({"max_steps": 300, "checkpoint_spacing": "geometric"})


def test_final_model_closes_a_short_last_interval():
    short = {"max_steps": 20, "checkpoint_interval": 8, "warmup_steps": 2, "checkpoint_spacing": "linear"}
    stages = evolution_stages(short, "m")
    assert list(stages) == ["init", "step8", "step16", "step20"]
    assert stages["step20"] == str(Path("m/final.pt"))
    assert evolution_steps(short) == [0, 8, 16, 20]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(GeometryError, match=r"missing \(step10: .*step000010\.pt\).*rerun the training job"):
        analyze_evolution({"step10": tmp_path / "checkpoints" / "step000010.pt"}, "p.txt", "t.json", tmp_path, {})


def test_checkpoint_whose_step_disagrees_with_its_stage_is_refused(tmp_path):
    text = "The lobster is a species of clawed lobster."
    tokenizer = CharTokenizer.from_text(text)
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "prompts.txt").write_text(text + "\n")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "init.pt", model, {"step": 0})
    save_checkpoint(tmp_path / "other.pt", model, {"step": 7})
    settings = {"heatmap_layers": [0], "exclude_first_token": False, "knn_k": 3, "device": "cpu"}
    with pytest.raises(GeometryError, match="step5 holds step 7"):
        analyze_evolution({"init": tmp_path / "init.pt", "step5": tmp_path / "other.pt"},
                          tmp_path / "prompts.txt", tmp_path / "tokenizer.json", tmp_path / "out", settings)


# ----------------------------------------------------------------------------- figures


def assert_rerun_identical(plot, tmp_path: Path, name: str) -> Path:
    """Draw twice: a real PNG, byte-identical both times (deterministic, atomic writes)."""
    first, second = plot(tmp_path / f"{name}_1.png"), plot(tmp_path / f"{name}_2.png")
    assert_png(first)
    assert first.read_bytes() == second.read_bytes(), name
    assert not list(tmp_path.glob(".*.tmp"))
    return first


def test_plot_metrics_by_step(tmp_path):
    summary = summarize_metrics(make_metrics())
    log = make_log()
    assert_rerun_identical(lambda p: plot_metrics_by_step(summary, p, TITLE, DATA_LABEL, train_log=log),
                           tmp_path, "with_loss")
    # without the loss panel, and with a metric absent from the data: a 'no data' panel, no crash
    partial = summary[summary["metric"] != "twonn"]
    assert_png(plot_metrics_by_step(partial, tmp_path / "no_loss.png", TITLE, DATA_LABEL,
                                    metrics=["mean_cosine", "update_norm", "twonn"]))


def test_plot_heatmaps_before_after(tmp_path):
    npz = make_npz(tmp_path / "similarity.npz")
    assert_rerun_identical(lambda p: plot_heatmaps_before_after(npz, p, TITLE, DATA_LABEL), tmp_path, "heatmaps")
    with pytest.raises(ValueError, match="stage 'step999' not stored"):
        plot_heatmaps_before_after(npz, tmp_path / "bad.png", TITLE, DATA_LABEL, after="step999")


def test_evolution_figures_in_one_call_match_the_figures_drawn_one_by_one(tmp_path):
    """Rule evolution_figures draws the three evolution figures of a model in one process:
    the same bytes as each drawn alone, every format of each written, and a missing or
    unknown figure name refused."""
    metrics, log, npz = make_metrics(n_prompts=4), make_log(), make_npz(tmp_path / "similarity.npz")
    summary = summarize_metrics(metrics)
    together = tmp_path / "together"
    out_paths = {name: [together / f"{name}.png", together / f"{name}.svg"] for name in EVOLUTION_FIGURES}
    written = plot_evolution_figures(summary, npz, metrics, out_paths, TITLE, DATA_LABEL, train_log=log)
    assert written == {name: together / f"{name}.png" for name in EVOLUTION_FIGURES}
    alone = {
        "metrics_by_step": plot_metrics_by_step(summary, tmp_path / "m.png", TITLE, DATA_LABEL, train_log=log),
        "heatmaps_before_after": plot_heatmaps_before_after(npz, tmp_path / "h.png", TITLE, DATA_LABEL),
        "similarity_change": plot_similarity_change(metrics, tmp_path / "c.png", TITLE, DATA_LABEL),
    }
    for name in EVOLUTION_FIGURES:
        assert written[name].read_bytes() == alone[name].read_bytes(), name
        assert b"<svg" in (together / f"{name}.svg").read_bytes(), name
    with pytest.raises(ValueError, match=r"given for \['heatmaps_before_after', 'metrics_by_step', 'typo'\]"):
        plot_evolution_figures(summary, npz, metrics, {**{n: out_paths[n] for n in EVOLUTION_FIGURES[:2]},
                                                       "typo": tmp_path / "t.png"}, TITLE, DATA_LABEL)


def test_plot_similarity_change(tmp_path):
    metrics = make_metrics(n_prompts=4)
    assert_rerun_identical(lambda p: plot_similarity_change(metrics, p, TITLE, DATA_LABEL), tmp_path, "change")
    one_prompt = make_metrics(n_prompts=1)
    assert_png(plot_similarity_change(one_prompt, tmp_path / "one_prompt.png", TITLE, DATA_LABEL, after="step100"))
    with pytest.raises(ValueError, match="stage 'trained' not in the metrics table"):
        plot_similarity_change(metrics, tmp_path / "bad.png", TITLE, DATA_LABEL, after="trained")


def test_metrics_by_step_uses_a_log_step_axis_shared_by_every_panel():
    summary = summarize_metrics(make_metrics())
    fig = figures_evolution._figure_metrics_by_step(summary, TITLE, DATA_LABEL, make_log(),
                                                    figures_evolution.EVOLUTION_METRICS)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 1 + len(figures_evolution.EVOLUTION_METRICS) <= 9
    assert all(ax.get_xscale() == "symlog" for ax in panels)  # 0 (init) shown, log above step 1
    assert all(ax.get_shared_x_axes().joined(panels[0], ax) for ax in panels)
    fig.draw_without_rendering()
    ticks = {t.get_text() for t in panels[-1].get_xticklabels() if t.get_text()}
    assert {"0", "1", "10", "100"} <= ticks
    # the layers are named in a legend (not a thin colour bar), one entry per layer
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == LAYER_NAMES


def test_heatmaps_before_after_show_the_change_beyond_the_mean_shift(tmp_path):
    npz = make_npz(tmp_path / "similarity.npz")
    fig = figures_evolution._figure_heatmaps_before_after(npz, TITLE, DATA_LABEL, "init", None, 0, 16)
    change_axes = [ax for ax in fig.axes if ax.get_title().startswith("change beyond the mean shift")]
    assert len(change_axes) == 2
    with np.load(npz) as stored:  # rows are words ('The', 'lobst$'): compare on the word view
        spans = word_spans(list(stored["tokens/prompt0"]))
        before = word_matrix(stored["init/layer3/prompt0"], spans)
        after = word_matrix(stored["step250/layer3/prompt0"], spans)
    expected, shift = centred_change(after, before)
    shown = change_axes[1].images[0].get_array().filled(np.nan)
    assert np.allclose(shown, expected, equal_nan=True)
    assert f"mean shift {shift:+.2f}" in change_axes[1].get_title()
    assert any("(after − its mean) − (before − its mean)" in t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("figure", ["metrics_by_step", "metrics_by_step_without_loss", "heatmaps_before_after",
                                    "similarity_change"])
def test_evolution_figure_text_is_inside_readable_and_not_overlapping(figure, tmp_path):
    long_title = "llama-postln-layernorm (seed 2): post-LN, layernorm, swiglu, 6 layers x 384 dims"
    build = {
        "metrics_by_step": lambda: figures_evolution._figure_metrics_by_step(
            summarize_metrics(make_metrics()), long_title, DATA_LABEL, make_log(), figures_evolution.EVOLUTION_METRICS),
        "metrics_by_step_without_loss": lambda: figures_evolution._figure_metrics_by_step(
            summarize_metrics(make_metrics()), long_title, DATA_LABEL, None, METRIC_NAMES),
        "heatmaps_before_after": lambda: figures_evolution._figure_heatmaps_before_after(
            make_npz(tmp_path / "s.npz", T=40), long_title, DATA_LABEL, "init", None, 0, 16),
        "similarity_change": lambda: figures_evolution._figure_similarity_change(
            make_metrics(n_prompts=6), long_title, DATA_LABEL, "init", None, "mean_cosine"),
    }[figure]
    problems = text_layout_problems(build())
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- end to end

VARIANT = "llama-preln"  # in the tiny study, with checkpoint_interval 8: a short last interval
EVOLUTION = [f"outputs/evolution/{VARIANT}/seed0/{name}" for name in
             ("metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png")]


def test_one_variants_evolution_targets_build_every_stage(tiny_study, tmp_path):
    out = tiny_study / "outputs"
    checkpoints = sorted(p.name for p in (out / "models" / VARIANT / "seed0" / "checkpoints").glob("*.pt"))
    assert checkpoints == ["step000008.pt", "step000016.pt"]
    summary = pd.read_csv(out / "evolution" / VARIANT / "seed0" / "summary.csv")
    stages = summary.drop_duplicates("stage")
    assert list(stages["stage"]) == ["init", "step8", "step16", "step20"]  # step20 = final.pt (20 = max_steps)
    assert list(stages["step"]) == [0, 8, 16, 20]
    assert set(summary["metric"]) == set(METRIC_NAMES)
    # the train token file reached the analysis: one frequency correlation per stage
    freq = summary[summary["metric"] == "mean_logit_freq_corr"]
    assert freq["layer_name"].tolist() == ["final_norm"] * 4 and freq["mean"].between(-1, 1).all()
    assert set(summary[summary["metric"] == "cross_prompt_cosine"]["n_prompts"]) == {2}  # both prompts pooled
    with np.load(out / "evolution" / VARIANT / "seed0" / "similarity.npz") as npz:
        assert {"init/layer0/prompt0", "step20/layer3/prompt1"} <= set(npz.files)
    for target in EVOLUTION:
        assert_png(tiny_study / target)
    for log in (out / "logs").rglob("*.log"):
        assert "Traceback" not in log.read_text(), log
    # One variant's evolution targets, asked for in a fresh folder, train no other variant.
    jobs = planned_jobs(make_study(tmp_path), *EVOLUTION)
    assert ("train", VARIANT) in jobs and {variant for _, variant in jobs if variant} == {VARIANT}


def test_report_is_self_contained_html(tiny_study, tmp_path):
    report = tmp_path / "report.html"  # outside the shared study
    snakemake(tiny_study, "--report", str(report), *EVOLUTION)
    html = report.read_text(encoding="utf-8")
    assert "metrics_by_step.png" in html and "data:image/png" in html
    assert '"evolution"' in html and "All panels share the x axis" in html
    assert 'src="http' not in html  # nothing fetched from the network when opened


def test_metrics_by_step_draws_the_twonn_noise_floor(tmp_path):
    """The TwoNN panel shows its Gaussian floor (issue 21: the figures draw the floor), from
    summary.csv's null columns, and no other panel gets one; the text still fits."""
    from tga.figure_style import FLOOR_STYLE, text_layout_problems
    from tga.figures_evolution import _figure_metrics_by_step

    summary = summarize_metrics(make_metrics())
    twonn = summary["metric"] == "twonn"
    summary.loc[twonn, ["null_mean", "null_lo", "null_hi"]] = [27.0, 18.0, 41.0]
    fig = _figure_metrics_by_step(summary, TITLE, DATA_LABEL, make_log(), ["mean_cosine", "twonn"])
    floors = {ax.get_title(): [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"
                               and ln.get_color() == FLOOR_STYLE["color"]] for ax in fig.axes}
    with_floor = {title: lines for title, lines in floors.items() if lines}
    assert len(with_floor) == 1 and "TwoNN" in next(iter(with_floor))
    (line,) = next(iter(with_floor.values()))
    assert list(line.get_ydata()) == [27.0, 27.0]
    assert any("noise floor" in t.get_text() for legend in fig.legends for t in legend.get_texts())
    assert not text_layout_problems(fig)
    # without the null columns (an old summary.csv) no floor and no legend entry
    plain = _figure_metrics_by_step(summary.drop(columns=["null_mean", "null_lo", "null_hi", "null_percentile"],
                                                 errors="ignore"), TITLE, DATA_LABEL, None, ["twonn"])
    assert not any(ln.get_color() == FLOOR_STYLE["color"] for ax in plain.axes for ln in ax.get_lines())
