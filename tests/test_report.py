"""The HTML report's captions, checked against what the figure and table code produce.

A caption is a promise about a figure: which intervals its bands are, which correction
its stars survived, what layer 0 holds. Those facts live in the code (tga.figures_*,
tga.compare, tga.model), so the captions are checked against the code's own output:
the report is rendered from a finished tiny study, each figure is drawn again from that
study's files with the functions the workflow scripts call, and the text the figure
holds (titles, labels, legends, colour bars) is compared with the caption. Each check
is also run on a caption as it used to read, to show that it fails there.
"""

from __future__ import annotations

import html
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import jinja2
import matplotlib.text
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from workflow_runs import snakemake

from tga.compare import write_differences
from tga.evolution import evolution_steps
from tga.figures_compare import plot_differences_table, plot_perplexity_table, plot_similarity_by_layer_files
from tga.figures_evolution import plot_heatmaps_before_after, plot_metrics_by_step, plot_similarity_change
from tga.figures_model import plot_geometry_layers, plot_similarity_heatmaps, plot_training_curves
from tga.geometry import resolve_exclude_first_token, tokenizer_adds_bos
from tga.model import ModelConfig, Transformer
from tga.schema import key_specs
from tga.settings import resolve_variant
from tga.tokenizers import CharTokenizer, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "workflow" / "report"

# ----------------------------------------------------------------------------- the rendered report


@dataclass(frozen=True)
class Caption:
    figure: str  # a PNG's name without .png (one rule may draw several figures), else the file name
    text: str


@dataclass(frozen=True)
class Report:
    description: str  # workflow.rst as rendered, tags stripped
    config: dict  # the config the report was rendered with (its JSON block)
    captions: dict[str, Caption]  # output path -> figure and caption text


def _plain(fragment: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment))).strip()


def _script_value(page: str, script_id: str, variable: str):
    """The JSON value Snakemake's report assigns to ``var <variable> = ...`` in its
    ``<script id="<script_id>">`` block."""
    block = page.index(f'<script id="{script_id}">')
    start = page.index(f"var {variable} = ", block) + len(f"var {variable} = ")
    return json.JSONDecoder().raw_decode(page[start:])[0]


def parse_report(page: str) -> Report:
    description_html = _script_value(page, "workflow-desc", "workflow_desc")
    description = _plain(description_html)
    config_text = description[description.index("{", description.index("Configuration used")):]
    config = json.JSONDecoder().raw_decode(config_text)[0]
    captions = {
        path: Caption(Path(path).stem if path.endswith(".png") else Path(path).name, _plain(entry.get("caption") or ""))
        for path, entry in _script_value(page, "results", "results").items()
    }
    return Report(description[: description.index("Configuration used")], config, captions)


@pytest.fixture(scope="module")
def report(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(tiny_study, "--report", str(out))  # the study's own config (.test/config/config.yaml)
    return parse_report(out.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- what a figure draws


@contextmanager
def recorded_figure_text() -> Iterator[list[str]]:
    """Every text artist (titles, axis labels, tick labels, legends, colour bars) of every
    figure saved inside the block."""
    texts: list[str] = []
    original = Figure.savefig

    def recording(fig: Figure, *args, **kwargs):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", recording)
        yield texts


def _two_seed_summaries(study: Path, folder: Path, variants: list[str]) -> tuple[list[Path], list[dict]]:
    """Each variant's seed-0 summary as seeds 0 and 1 (seed 1 shifted by a small,
    layer-dependent amount), so the across-seed figures draw their several-seed form."""
    paths, labels = [], []
    for variant in variants:
        source = study / "outputs" / "geometry" / variant / "seed0" / "summary.csv"
        shifted = pd.read_csv(source)
        shifted["mean"] = shifted["mean"] * (1.0 + 0.01 * (shifted["layer"] + 1) * (1 + variants.index(variant)))
        copy = folder / f"{variant}_seed1.csv"
        shifted.to_csv(copy, index=False)
        paths += [source, copy]
        labels += [{"variant": variant, "seed": 0}, {"variant": variant, "seed": 1}]
    return paths, labels


def figure_drawings(study: Path, config: dict, folder: Path) -> dict[str, list[Callable[[], object]]]:
    """Figure (file name without suffix) -> the calls that draw it, on the study's own files. The figures across
    seeds are drawn a second time from two seeds, so both of their forms are seen."""
    out = study / "outputs"
    variant = sorted(config["variants"])[0]
    run = f"{variant}/seed{config['seeds'][0]}"
    png = folder / "figure.png"
    label = config["data"]["label"]
    variants = list(config["variants"])
    two_seed_paths, two_seed_labels = _two_seed_summaries(study, folder, variants)
    two_seed_ppl = pd.read_csv(out / "compare" / "perplexity.csv")
    two_seed_ppl = pd.concat([two_seed_ppl, two_seed_ppl.assign(seed=1, token_ppl=two_seed_ppl["token_ppl"] * 1.05,
                                                                bits_per_byte=two_seed_ppl["bits_per_byte"] * 1.01)])
    two_seed_ppl.to_csv(folder / "perplexity.csv", index=False)
    write_differences(two_seed_paths, two_seed_labels, config["comparisons"], folder / "difference.csv")
    return {
        "training_curves": [lambda: plot_training_curves(
            pd.read_csv(out / "models" / run / "train_log.csv"), png, variant, label)],
        "geometry_layers": [lambda: plot_geometry_layers(
            pd.read_csv(out / "geometry" / run / "summary.csv"), png, variant, label)],
        "similarity_heatmaps": [lambda: plot_similarity_heatmaps(
            out / "geometry" / run / "similarity.npz", png, variant, label)],
        "perplexity": [lambda: plot_perplexity_table(out / "compare" / "perplexity.csv", png, label),
                            lambda: plot_perplexity_table(folder / "perplexity.csv", png, label)],
        "similarity_by_layer": [
            lambda: plot_similarity_by_layer_files(
                [out / "geometry" / v / f"seed{s}" / "summary.csv" for v in variants for s in config["seeds"]],
                [{"variant": v, "seed": s} for v in variants for s in config["seeds"]], png, label),
            lambda: plot_similarity_by_layer_files(two_seed_paths, two_seed_labels, png, label)],
        "difference": [lambda: plot_differences_table(out / "compare" / "difference.csv", png, label),
                             lambda: plot_differences_table(folder / "difference.csv", png, label)],
        "metrics_by_step": [lambda: plot_metrics_by_step(
            pd.read_csv(out / "evolution" / run / "summary.csv"), png, variant, label,
            train_log=pd.read_csv(out / "models" / run / "train_log.csv"))],
        "heatmaps_before_after": [lambda: plot_heatmaps_before_after(
            out / "evolution" / run / "similarity.npz", png, variant, label)],
        "similarity_change": [lambda: plot_similarity_change(
            pd.read_csv(out / "evolution" / run / "metrics.csv"), png, variant, label)],
    }


@pytest.fixture(scope="module")
def drawn(report: Report, tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Figure -> all the text it holds, over every drawing of it."""
    folder = tmp_path_factory.mktemp("figures")
    texts = {}
    for figure, drawings in figure_drawings(tiny_study, report.config, folder).items():
        with recorded_figure_text() as recorded:
            for draw in drawings:
                draw()
        texts[figure] = " ".join(recorded)
    return texts


# ----------------------------------------------------------------------------- the checks

#: What a caption may promise about a figure: (pattern in the caption, pattern in the figure).
CLAIMS: dict[str, tuple[str, str]] = {
    "throughput": (r"throughput|tokens ?/ ?s\b|tokens per second", r"throughput|tokens ?/ ?s\b"),
    "wall time": (r"wall[- ]?(?:clock )?time|elapsed", r"wall|elapsed|\(s\)"),
    "a 95% interval": (r"95 ?%", r"95 ?%"),
    "±1 s.d. bands": (r"s\.d\.|standard deviation", r"s\.d\."),
    "significance stars": (r"\bstars?\b", r"\bstar\b"),
    "a fixed colour range [−1, 1]": (r"\[[−-]1, 1\]", r"\[[−-]1, 1\]"),
    "the learning rate": (r"learning[- ]rate", r"learning[- ]rate"),
}
#: Claims a figure must not draw without its caption explaining them.
MUST_EXPLAIN = ("a 95% interval", "±1 s.d. bands", "significance stars")


def caption_problems(caption: str, figure_text: str) -> list[str]:
    """What the caption promises that the figure lacks, and the intervals and marks the
    figure draws that the caption does not explain."""
    problems = []
    for claim, (in_caption, in_figure) in CLAIMS.items():
        said = re.search(in_caption, caption, re.IGNORECASE) is not None
        shown = re.search(in_figure, figure_text, re.IGNORECASE) is not None
        if said and not shown:
            problems.append(f"the caption mentions {claim}, which the figure does not draw")
        if shown and not said and claim in MUST_EXPLAIN:
            problems.append(f"the figure draws {claim}, which the caption does not explain")
    return problems


def _normalise(text: str) -> str:
    return re.sub(r"[\u2010-\u2015]", "-", text).lower()


@pytest.mark.workflow
def test_every_report_figure_is_drawn_by_a_known_script(report, drawn):
    """The checks below cover every figure in the report: a new figure must be
    added to figure_drawings, or its caption goes unchecked."""
    figures = {c.figure for path, c in report.captions.items() if path.endswith(".png")}
    assert figures and figures <= set(drawn), sorted(figures - set(drawn))
    for path, caption in report.captions.items():
        assert len(caption.text) > 80, f"{path}: caption missing or too short: {caption.text!r}"


@pytest.mark.workflow
def test_captions_promise_only_what_their_figure_draws(report, drawn):
    problems = [f"{path} ({c.figure}): {problem}"
                for path, c in sorted(report.captions.items()) if c.figure in drawn
                for problem in caption_problems(c.text, drawn[c.figure])]
    assert not problems, "\n".join(problems)


@pytest.mark.workflow
def test_the_caption_check_fails_on_the_old_training_caption(report, drawn):
    """The training-curves caption used to promise throughput and wall time."""
    old = ("Right: the learning-rate schedule (linear warmup, then cosine decay), with the "
           "median throughput and wall time.")
    problems = caption_problems(old, drawn["training_curves"])
    assert any("throughput" in p for p in problems) and any("wall time" in p for p in problems), problems
    # ... and a caption that leaves out the bands a figure draws is caught too
    similarity = next(c.text for c in report.captions.values() if c.figure == "similarity_by_layer")
    without_bands = re.sub(r"95% t-interval|±1 s\.d\.", "band", similarity)
    assert len(caption_problems(without_bands, drawn["similarity_by_layer"])) == 2


def _correction_used(study: Path) -> str:
    """The multiple-testing correction the comparison code applied, as it wrote it."""
    corrections = set(pd.read_csv(study / "outputs" / "compare" / "difference.csv")["correction"].dropna())
    assert len(corrections) == 1, corrections
    return corrections.pop()


def correction_problems(caption: str, correction: str) -> list[str]:
    """A caption about significance must name the correction the code applies, and must
    not say that there is none."""
    problems = []
    if _normalise(correction) not in _normalise(caption):
        problems.append(f"does not name the {correction} correction")
    if re.search(r"\bno (multiple[- ]testing )?correction|uncorrected", caption, re.IGNORECASE):
        problems.append("says the stars are uncorrected")
    return problems


@pytest.mark.workflow
def test_the_difference_caption_names_the_correction_the_code_applies(report, tiny_study, drawn):
    correction = _correction_used(tiny_study)
    assert _normalise(correction) in _normalise(drawn["difference"])  # the figure's legend names it
    captions = [c.text for c in report.captions.values() if c.figure == "difference"]
    assert captions and not correction_problems(captions[0], correction), correction_problems(captions[0], correction)


@pytest.mark.workflow
def test_the_correction_check_fails_on_an_uncorrected_caption(tiny_study):
    correction = _correction_used(tiny_study)
    assert correction_problems("A star marks a layer whose 95% CI excludes 0 (no correction for the many "
                               "layers).", correction) == [f"does not name the {correction} correction",
                                                           "says the stars are uncorrected"]
    assert correction_problems(f"A star marks a layer significant after the {correction} correction.",
                               correction) == []


def _literals(text: str) -> set[str]:
    """The ``code`` names a caption uses, as the rendered report shows them (the HTML's
    <tt>/<code> tags are stripped, so they are read from the caption files instead)."""
    return set(re.findall(r"``([^`]+)``", text))


@pytest.mark.workflow
def test_the_perplexity_table_caption_names_every_column(tiny_study):
    columns = set(pd.read_csv(tiny_study / "outputs" / "compare" / "perplexity.csv").columns)
    named = _literals((REPORT_DIR / "perplexity_table.rst").read_text(encoding="utf-8"))
    assert named == columns, f"named but absent: {sorted(named - columns)}; unnamed: {sorted(columns - named)}"


@pytest.mark.workflow
def test_the_metrics_listed_are_those_the_geometry_writes(report, tiny_study):
    """workflow.rst lists every metric in metrics.csv, and describes adjusted_cosine as
    the geometry computes it: mean_cosine minus the cross-prompt baseline."""
    source = (REPORT_DIR / "workflow.rst").read_text(encoding="utf-8")
    paragraph = source[source.index("**Metrics**"):source.index("**Bands.**")]
    metrics_csv = next((tiny_study / "outputs" / "geometry").glob("*/seed*/metrics.csv"))
    written = set(pd.read_csv(metrics_csv)["metric"])
    assert _literals(paragraph) == written

    summary = pd.read_csv(metrics_csv.with_name("summary.csv")).pivot_table(
        index=["stage", "layer"], columns="metric", values="mean")
    expected = summary["mean_cosine"] - summary["cross_prompt_cosine"]
    assert (summary["adjusted_cosine"] - expected).abs().max() < 1e-6
    assert re.search(r"adjusted_cosine \( ?mean_cosine minus (that|the cross-prompt) baseline", report.description)
    assert "centr" not in report.description.lower()  # it used to say "after mean-centring"


# ----------------------------------------------------------------------------- layer 0 and positions


def render_description(config: dict, template: str | None = None) -> str:
    """workflow.rst through Jinja, as Snakemake renders it (before reStructuredText)."""
    text = template if template is not None else (REPORT_DIR / "workflow.rst").read_text(encoding="utf-8")
    rendered = jinja2.Environment().from_string(text).render(snakemake=SimpleNamespace(config=config))
    return re.sub(r"\s+", " ", rendered)


def layer_zero_claims(description: str) -> dict[str, bool]:
    """Variant (or '*' for an unnamed statement) -> whether the text says layer 0 holds
    the position, read from the sentences about the embedding output."""
    claims: dict[str, bool] = {}
    for match in re.finditer(r"(?:\(([^()]*)\) )?layer 0 is the token embedding (alone|plus the position)",
                             description):
        for name in (match[1] or "*").split(", "):
            claims[name] = match[2] != "alone"
    if re.search(r"embedding output \(token \+ position\)", description):
        claims["*"] = True
    return claims


def embedding_output_has_position(position_encoding: str) -> bool:
    """Whether the model's hidden state 0 differs between copies of one token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict({"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
                                               "vocab_size": 20, "dropout": 0.0,
                                               "position_encoding": position_encoding})).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([[5, 5, 5]]), return_hidden_states=True).hidden_states[0]
    return not torch.allclose(hidden[0, 0], hidden[0, 1])


@pytest.mark.workflow
def test_the_report_says_what_layer_zero_holds_in_this_study(report):
    default = report.config["model"]["position_encoding"]
    expected = {name: embedding_output_has_position(settings.get("position_encoding", default))
                for name, settings in report.config["variants"].items()}
    assert layer_zero_claims(report.description) == expected


@pytest.mark.parametrize("positions", [["rope", "rope"], ["learned", "learned"], ["rope", "learned"]])
def test_layer_zero_wording_follows_each_variants_position_encoding(positions):
    config = {"data": {"label": "x"}, "seeds": [0], "geometry": {"exclude_first_token": False},
              "model": {"position_encoding": "rope"},
              "variants": {f"v{i}": {"position_encoding": p} for i, p in enumerate(positions)}}
    assert set(positions) <= set(key_specs("model")["position_encoding"]["enum"])
    expected = {f"v{i}": embedding_output_has_position(p) for i, p in enumerate(positions)}
    assert layer_zero_claims(render_description(config)) == expected


def test_the_layer_zero_check_fails_on_the_old_wording():
    """workflow.rst used to say 'token + position' whatever the position encoding."""
    old = "Layers are numbered as in the model: 0 = embedding output (token + position), 1..N = block i."
    config = {"variants": {"v": {"position_encoding": "rope"}}}
    expected = {"v": embedding_output_has_position("rope")}
    assert layer_zero_claims(render_description(config, old)) != expected


# ----------------------------------------------------------------------------- position 0


def says_position_zero_dropped(description: str) -> bool:
    """Whether the Tokens paragraph says position 0 is left out of the metrics (it must
    say one or the other)."""
    dropped = "after dropping position 0" in description
    kept = "position 0 is kept" in description
    assert dropped != kept, "the Tokens paragraph must say whether position 0 is dropped"
    return dropped


def first_token_config(setting) -> dict:
    return {"data": {"label": "x"}, "seeds": [0], "geometry": {"exclude_first_token": setting},
            "model": {"position_encoding": "rope"}, "variants": {"v": {}}}


@pytest.mark.parametrize("setting", key_specs("geometry")["exclude_first_token"]["enum"])
def test_the_tokens_paragraph_says_what_exclude_first_token_resolves_to(setting):
    """``auto`` is a truthy string, but it keeps position 0 for tga's own tokenizers: the
    report must say what the geometry does (tga.geometry.resolve_exclude_first_token with
    the variants' tokenizer), not whether the setting is set."""
    adds_bos = tokenizer_adds_bos(CharTokenizer(list("ab")))
    assert adds_bos == Tokenizer.adds_bos  # the GPT-2 tokenizer inherits the base class's
    expected = resolve_exclude_first_token(setting, adds_bos)
    assert says_position_zero_dropped(render_description(first_token_config(setting))) == expected


def test_the_position_zero_check_fails_on_a_template_that_reads_auto_as_true():
    """The Tokens paragraph as it read before ``auto``: any truthy setting said 'dropped'."""
    old = ("**Tokens.** first occurrence only{%- if snakemake.config['geometry']['exclude_first_token'] %}, "
           "after dropping position 0{% else %}; position 0 is kept{% endif %}.")
    expected = resolve_exclude_first_token("auto", tokenizer_adds_bos(CharTokenizer(list("ab"))))
    assert says_position_zero_dropped(render_description(first_token_config("auto"), old)) != expected


@pytest.mark.workflow
def test_the_evolution_figure_lists_the_steps_its_caption_promises(report, drawn):
    """metrics_by_step.rst says the legend lists the analysed steps: those the
    evolution code derives from the training settings."""
    caption = next(c.text for c in report.captions.values() if c.figure == "metrics_by_step")
    assert "legend under the figure lists their steps" in caption
    variant = sorted(report.config["variants"])[0]
    steps = evolution_steps(resolve_variant(report.config, variant)["training"])
    assert f"({', '.join(map(str, steps))})" in drawn["metrics_by_step"]
