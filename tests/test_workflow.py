"""End-to-end runs of the real workflow on a tiny config in a temporary folder."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from workflow_runs import (
    ROOT,
    copy_study,
    listed_jobs,
    make_study,
    make_workdir,
    planned_jobs,
    snakemake,
    tiny_config,
)

# The tiny study (.test/config/config.yaml; the session fixture tiny_study runs it once):
# two of the default variants (Pre-LN vs Post-LN), one comparison, the whole DAG at half the jobs.
VARIANTS = ["llama-preln", "llama-postln"]
CHECKPOINTS = {"llama-preln": {"step000008.pt", "step000016.pt"},  # checkpoint_interval 8
               "llama-postln": {"step000010.pt", "step000020.pt"}}
# The same settings for a test's own workdir (make_workdir), whose variants it names itself.
TINY = tiny_config()


def test_every_declared_output_exists_and_is_sane(tiny_study):
    out = tiny_study / "outputs"
    for split in ("train", "validation", "test"):
        meta = json.loads((out / "data" / "tokens" / f"{split}.json").read_text())
        assert meta["tokenizer"] == "char" and meta["n_tokens"] > 1000
    vocab = json.loads((out / "data" / "tokens" / "test.json").read_text())["vocab_size"]
    for variant in VARIANTS:
        model = out / "models" / variant / "seed0"
        assert {p.name for p in (model / "checkpoints").glob("*.pt")} == CHECKPOINTS[variant]
        log = pd.read_csv(model / "train_log.csv")
        assert list(log["step"]) == [0, 10, 20] and log["val_loss"].iloc[-1] < log["val_loss"].iloc[0]
        ppl = json.loads((out / "eval" / variant / "seed0" / "perplexity.json").read_text())
        assert 1 < ppl["token_ppl"] < vocab and math.isfinite(ppl["bits_per_byte"])
        assert ppl["n_tokens_scored"] == json.loads((out / "data" / "tokens" / "test.json").read_text())["n_tokens"] - 1
        geometry = out / "geometry" / variant / "seed0"
        summary = pd.read_csv(geometry / "summary.csv")
        assert set(summary["stage"]) == {"init", "trained"}
        assert sorted(summary["layer"].unique()) == [0, 1, 2, 3]  # embedding, 2 blocks, final norm
        cos = summary[(summary.metric == "mean_cosine")]["mean"]
        assert cos.between(-1, 1).all()
        with np.load(geometry / "similarity.npz") as npz:
            assert {"init/layer0/prompt0", "trained/layer3/prompt1"} <= set(npz.files)
        for figure in ("geometry_layers", "similarity_heatmaps", "training_curves"):
            assert Image.open(out / "figures" / variant / "seed0" / f"{figure}.png").size[0] > 300
    table = pd.read_csv(out / "compare" / "perplexity.csv")
    assert sorted(table["variant"]) == sorted(VARIANTS)
    differences = pd.read_csv(out / "compare" / "difference.csv")
    assert list(differences["comparison"].unique()) == ["llama-preln - llama-postln"]
    assert "tests were run" in (out / "compare" / "findings.md").read_text(encoding="utf-8")
    for figure in ("difference", "similarity_by_layer", "perplexity"):
        assert Image.open(out / "compare" / f"{figure}.png").size[0] > 300
    for log in (out / "logs").rglob("*.log"):
        assert "Traceback" not in log.read_text(), log
    assert any((out / "benchmarks").rglob("*.tsv"))


def test_parallel_and_serial_runs_give_identical_outputs(tiny_study, tmp_path):
    """--cores 4 (all variants at once on this 2-core machine) equals --cores 1, byte for
    byte, except the wall-clock columns of the training logs."""
    serial = make_study(tmp_path)
    snakemake(serial, cores=1)
    skip = {"logs", "benchmarks"}
    parallel_files = sorted(p.relative_to(tiny_study) for p in (tiny_study / "outputs").rglob("*")
                            if p.is_file() and not skip & set(p.parts) and not p.name.startswith(".snakemake"))
    serial_files = sorted(p.relative_to(serial) for p in (serial / "outputs").rglob("*")
                          if p.is_file() and not skip & set(p.parts) and not p.name.startswith(".snakemake"))
    assert parallel_files == serial_files
    for rel in parallel_files:
        if rel.name == "train_log.csv":
            timing = ["tokens_per_s", "elapsed_s"]
            pd.testing.assert_frame_equal(pd.read_csv(tiny_study / rel).drop(columns=timing),
                                          pd.read_csv(serial / rel).drop(columns=timing))
        else:
            assert (tiny_study / rel).read_bytes() == (serial / rel).read_bytes(), rel


def test_second_run_has_nothing_to_do(tiny_study):
    assert planned_jobs(tiny_study) == []


def test_editing_one_variant_reruns_only_its_jobs(tiny_study, tmp_path):
    study = copy_study(tiny_study, tmp_path)
    config_file = study / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["variants"]["llama-postln"]["learning_rate"] = 1e-3
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))  # key order is part of the params
    jobs = planned_jobs(study)
    per_variant = {rule for rule, variant in jobs if variant}
    assert {variant for _, variant in jobs if variant} == {"llama-postln"}
    assert {"train", "evaluate", "geometry"} <= per_variant
    assert {rule for rule, variant in jobs if not variant} <= {
        "all", "perplexity_table", "plot_perplexity", "plot_similarity_by_layer", "difference_table",
        "plot_differences", "findings"}
    assert not {"prepare_corpus", "tokenize_split", "build_tokenizer"} & {rule for rule, _ in jobs}


def test_one_figure_with_three_seeds_from_the_command_line(tiny_study, tmp_path):
    """Asking for one figure builds only what it needs. `--config 'seeds=[0,1,2]'` arrives
    as strings; the schema's types win, and the difference table carries intervals, raw
    and adjusted p-values and the flags. On a copy of the tiny study: seed 0 is trained,
    so the run trains and measures seeds 1 and 2 and redraws the comparison."""
    study = copy_study(tiny_study, tmp_path)
    out = study / "outputs"
    figure = out / "compare" / "difference.png"
    figure.unlink()  # built again from three seeds
    run = snakemake(study, "outputs/compare/difference.png", "--config", "seeds=[0,1,2]")
    # Only what that figure needs was built, and nothing of seed 0 again.
    jobs = listed_jobs(run.stderr)
    assert {("train", variant) for variant in VARIANTS} <= set(jobs), run.stderr[-3000:]
    rules = {rule for rule, _ in jobs}
    assert "evaluate" not in rules and "model_figures" not in rules and "evolution_geometry" not in rules, rules
    assert len([job for job in jobs if job[0] == "train"]) == 4  # seeds 1 and 2 of two variants
    assert figure.is_file()
    assert not [path for path in (out / "eval").rglob("*") if "seed0" not in path.parts and path.is_file()]
    table = pd.read_csv(out / "compare" / "difference.csv")
    for column in ("mean_diff", "ci_low", "ci_high", "n_seeds", "p_value", "p_adjusted", "significant",
                   "effect_size", "correction", "n_tests"):
        assert column in table.columns, column
    tested = table[table["p_value"].notna()]
    assert set(tested["method"]) == {"paired"} and (tested["n_seeds"] == 3).all()
    assert set(table["correction"]) == {"Benjamini-Hochberg"}
    for (_, _), family in tested.groupby(["comparison", "stage"]):
        assert (family["n_tests"] == len(family)).all()
        assert (family["p_adjusted"] >= family["p_value"] - 1e-12).all()
    assert table["significant"].tolist() == (table["p_adjusted"] < 0.05).tolist()
    for seed in (0, 1, 2):
        assert (out / "geometry" / VARIANTS[0] / f"seed{seed}" / "summary.csv").is_file()


def _with(path: list[str], value):
    def edit(config: dict) -> dict:
        config = json.loads(json.dumps(config))
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        return config
    return edit


@pytest.mark.workflow
@pytest.mark.parametrize(
    "edit, message",
    [
        (_with(["model", "colour"], "red"), r"Invalid config: model: unknown key \('colour' was unexpected\)"),
        (_with(["model", "n_layer"], "six"), r"Invalid config: model\.n_layer: 'six' is not of type 'integer'"),
        (_with(["model", "n_head"], 3), r"n_embd=32 is not divisible by n_head=3"),
        (_with(["comparisons"], [["llama-preln", "gpt5"]]), r"comparisons\[0\] .* unknown variant 'gpt5'"),
        (_with(["geometry", "prompts"], "missing.txt"), r"geometry\.prompts: file 'missing.txt' does not exist"),
        (_with(["geometry", "prompts"], "empty.txt"), r"geometry\.prompts: file 'empty.txt' is empty"),
        (_with(["data", "test"], "nowhere/test.txt"), r"data\.test: file 'nowhere/test.txt' does not exist"),
        (_with(["training", "learning_rate"], -1), r"training\.learning_rate: -1 is less than or equal to the minimum of 0"),
    ],
)
def test_bad_config_stops_before_any_job_with_one_clear_message(tmp_path, edit, message):
    workdir = make_workdir(tmp_path, edit(TINY))
    (workdir / "empty.txt").write_text("")
    proc = snakemake(workdir, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "outputs").exists()


FIGURE_RULES = {
    "figures_model": {"model_figures"},
    "figures_compare": {"plot_perplexity", "plot_similarity_by_layer", "plot_differences"},
    "figures_evolution": {"evolution_figures"},
}


def test_library_code_changes_rerun_exactly_the_dependent_rules(tiny_study, tmp_path):
    """A copy of tga/ on PYTHONPATH stands in for an edited checkout: editing one figure
    module reruns only the rules drawing its figures (no table), the shared figure style
    reruns every figure and still no table, the table code reruns the tables and the
    figures drawn from them, the metric functions (reached only through tga.geometry's
    imports) rerun the geometry but not training, and editing the model reruns training
    onwards."""
    package = tmp_path / "site" / "tga"
    shutil.copytree(ROOT / "tga", package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(package.parent)}

    def planned_rules() -> set[str]:  # dry runs only: the shared study is not changed
        return {rule for rule, _ in planned_jobs(tiny_study, env=env)} - {"all"}

    def planned_after_editing(module: str) -> set[str]:
        source = package / f"{module}.py"
        original = source.read_text()
        source.write_text(original + "\n\ndef _an_edit() -> None:\n    return None\n")
        try:
            return planned_rules()
        finally:
            source.write_text(original)

    assert planned_rules() == set()  # same code, same fingerprints
    for module, rules in FIGURE_RULES.items():
        assert planned_after_editing(module) == rules, module
    assert planned_after_editing("figure_style") == set().union(*FIGURE_RULES.values())
    assert planned_after_editing("compare") == {"perplexity_table", "plot_perplexity", "difference_table",
                                                "plot_differences", "findings"}
    after_metrics = planned_after_editing("metrics")
    assert {"geometry", "evolution_geometry"} <= after_metrics and not {"train", "evaluate"} & after_metrics
    assert {"train", "evaluate", "geometry"} <= planned_after_editing("model")


def test_every_rule_fingerprints_the_modules_its_script_imports():
    """A rule whose ``code_fingerprint`` misses a module its script runs would not rerun
    when that code changes; one naming more would rerun for code it never runs."""
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        # rules defined under an `if` (data.smk's per-source rules) are indented
        for block in re.split(r"\n(?=\s*(?:checkpoint|rule) \w+:)", smk.read_text()):
            block = block.lstrip()
            script = re.search(r'script:\s*"\.\./scripts/([\w.]+)"', block)
            if not block.startswith(("rule ", "checkpoint ")) or not script:
                continue
            code = re.search(r"code=code_fingerprint\(([^)]*)\)", block)
            assert code, f"{smk.name}: {block.split(':')[0]} has no code fingerprint"
            declared = set(re.findall(r'"(tga\.\w+)"', code.group(1)))
            source = (ROOT / "workflow" / "scripts" / script.group(1)).read_text()
            imported = set(re.findall(r"^from (tga\.\w+) import", source, flags=re.M)) - {"tga.joblog"}
            assert declared == imported, f"{smk.name}: {block.split(':')[0]} fingerprints {declared}, runs {imported}"


def test_a_diverged_variant_is_marked_missing_with_keep_going(tiny_study, tmp_path):
    """Divergence is a result in the DAG: the run succeeds, the comparisons mark the
    diverged variant, and only a change of its settings trains it again. On a copy of the
    tiny study with a variant added that diverges; the steady variant's evolution is
    removed first, so the run that trains the diverging one also builds it."""
    study = copy_study(tiny_study, tmp_path)
    out = study / "outputs"
    config_file = study / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    steady = "llama-preln"
    config["variants"]["wild"] = {"norm_position": "post", "learning_rate": 1.0e6, "grad_clip": 0.0}
    config["comparisons"] = [[steady, "wild"]]
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))  # key order is part of the params
    shutil.rmtree(out / "evolution" / steady)
    first = snakemake(study, "--keep-going")
    assert re.search(r"warning: training of wild/seed0 diverged: the loss became NaN/inf at step \d+ \(seed 0\)",
                     first.stderr), first.stderr[-3000:]
    jobs = listed_jobs(first.stderr)
    assert ("train", "wild") in jobs and ("evolution_geometry", steady) in jobs, jobs
    status = json.loads((out / "models" / "wild" / "seed0" / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] > status["last_logged_step"]
    assert json.loads((out / "models" / steady / "seed0" / "status.json").read_text())["status"] == "ok"
    # nothing downstream of the diverged model ran; everything of the steady one did
    assert not (out / "eval" / "wild").exists() and not (out / "geometry" / "wild").exists()
    assert not (out / "evolution" / "wild").exists()
    assert (out / "evolution" / steady / "seed0" / "metrics_by_step.png").is_file()
    table = pd.read_csv(out / "compare" / "perplexity.csv")
    wild = table[table["variant"] == "wild"].iloc[0]
    assert wild["status"] == f"diverged at step {status['step']}" and math.isnan(wild["token_ppl"])
    assert table.set_index("variant").loc[steady, "status"] == "ok"
    differences = pd.read_csv(out / "compare" / "difference.csv")
    assert differences["missing"].dropna().eq("wild").all() and differences["missing"].notna().any()
    for figure in ("difference.png", "similarity_by_layer.png", "perplexity.png"):
        assert (out / "compare" / figure).is_file()
    assert not re.search(r"Traceback|onerror", first.stderr)

    # The outcome is recorded, so the next invocation has nothing to do ...
    assert planned_jobs(study) == []
    # ... until the diverged variant's settings change: then Snakemake trains it again.
    config["variants"]["wild"]["learning_rate"] = 2e-3
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    planned = planned_jobs(study)
    assert ("train", "wild") in planned and ("train", steady) not in planned
