# Config validation and the helpers every rule file uses. Nothing imported here may
# import torch at module level: `snakemake -n` builds the DAG without it.
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tga.schema import SCHEMA_PATH
from tga.settings import ConfigError, check_config, coerce_config_types, resolve_variant, schema_error_message
from tga.evolution import evolution_stages, evolution_steps
from tga.resources import estimate_variant_jobs, scheduler_resources, vocab_size_for
from tga.train import failure_matches_settings, read_failure_record


# --config values arrive as strings ('seeds=[0,1,2]' gives '0', '1', '2'): the schema decides their types.
config.update(coerce_config_types(dict(config)))
try:
    # The package's schema (workflow/schemas/config.schema.yaml links to it): the library
    # checks settings against the same file.
    validate(config, str(SCHEMA_PATH))
except WorkflowError as error:
    raise WorkflowError(schema_error_message(error)) from None
try:
    # Memory is checked against this machine only when the jobs run here; on a cluster
    # each job checks on its node, and the scheduler gets the estimates (mem_mb below).
    check_config(config, this_machine=workflow.local_exec, warn=lambda slow: print(f"tga: warning: {slow}", file=sys.stderr))
except ConfigError as error:
    raise WorkflowError(f"Invalid config: {error}") from None


VARIANTS = list(config["variants"])
SEEDS = config["seeds"]
SPLITS = ["train", "validation", "test"]


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS),
    seed=r"\d+",
    split="|".join(SPLITS),


def estimated_resources(job, key):
    """A rule's ``resources: <key>=`` as a function of the wildcards: ``mem_mb`` (host
    memory) and ``runtime`` (minutes) of this variant's ``job`` ("train", "evaluate",
    "geometry", "evolution") from tga/resources.py, times its safety factors
    (MEMORY_SAFETY_FACTOR, RUNTIME_SAFETY_FACTOR). A profile's set-resources wins.
    The char tokenizer's vocabulary is read from the built tokenizer once it exists."""

    def resource(wildcards):
        resolved = resolve_variant(config, wildcards.variant)
        vocab = vocab_size_for(config, "outputs/data/tokens/tokenizer.json")
        stages = len(evolution_stages(resolved["training"], ".")) if job == "evolution" else 2
        estimate = estimate_variant_jobs(config, resolved, vocab, workflow.local_exec, n_stages=stages)[job]
        return scheduler_resources(estimate)[key]

    return resource


def variant_settings(wildcards):
    """Only this variant's resolved settings, so other variants' edits never rerun it."""
    return resolve_variant(config, wildcards.variant)


def model_title(wildcards):
    """Figure title naming the variant, its seed and the choices that define it."""
    model = resolve_variant(config, wildcards.variant)["model"]
    return (
        f"{wildcards.variant} (seed {wildcards.seed}): {model['norm_position']}-LN, {model['norm']}, "
        f"{model['activation']}, {model['n_layer']} layers x {model['n_embd']} dims"
    )


def diverged_models():
    """Runs whose training diverged with their current settings (a failure record left
    by an earlier invocation): they are not retried, and the comparisons mark them."""
    found = []
    for v in VARIANTS:
        for s in SEEDS:
            record = read_failure_record(f"outputs/failed/{v}/seed{s}")
            if record and failure_matches_settings(record, resolve_variant(config, v), s):
                found.append({"variant": v, "seed": s, "step": record.get("step"), "message": record.get("message", "")})
    return found


DIVERGED = diverged_models()
MODELS = [
    {"variant": v, "seed": s}
    for v in VARIANTS
    for s in SEEDS
    if not any(d["variant"] == v and d["seed"] == s for d in DIVERGED)
]


def per_model(pattern):
    """``pattern`` for every configured variant and seed whose training has not diverged."""
    return [pattern.format(**m) for m in MODELS]


def model_labels():
    """(variant, seed) pairs in the order of ``per_model``."""
    return list(MODELS)


EVOLUTION_FIGURES = ["metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png", "training_loss.png"]


def evolution_stage_paths(wildcards):
    """init + every checkpoint the variant's training settings keep, as {stage: path}."""
    training = resolve_variant(config, wildcards.variant)["training"]
    return evolution_stages(training, f"outputs/models/{wildcards.variant}/seed{wildcards.seed}")


def evolution_analysed_steps(wildcards):
    """Training steps whose geometry the evolution figures show (0 = init)."""
    return evolution_steps(resolve_variant(config, wildcards.variant)["training"])


def evolution_outputs():
    """Every evolution figure of every variant and seed."""
    return [f"outputs/evolution/{m['variant']}/seed{m['seed']}/{name}" for m in MODELS for name in EVOLUTION_FIGURES]


def all_outputs():
    return [
        *per_model("outputs/figures/{variant}/seed{seed}/geometry_layers.png"),
        *per_model("outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png"),
        *per_model("outputs/figures/{variant}/seed{seed}/training_curves.png"),
        "outputs/compare/perplexity.csv",
        "outputs/compare/perplexity.png",
        "outputs/compare/similarity_by_layer.png",
        "outputs/compare/difference.png",
        "outputs/compare/difference.csv",
        *evolution_outputs(),
        *pretrained_outputs(),
    ]


def compare_despite_divergence():
    """When a --keep-going run ends with diverged trainings, build the comparison tables
    and figures from the models that finished, marking the diverged runs, so the run
    that found the divergence already shows what it means for the comparison."""
    from pathlib import Path

    from tga.compare import write_differences, write_perplexity_table
    from tga.figures_compare import plot_differences_table, plot_perplexity_table, plot_similarity_by_layer_files

    diverged = diverged_models()
    if not diverged:
        return
    lost = {(d["variant"], d["seed"]) for d in diverged}
    finished = [
        {"variant": v, "seed": s}
        for v in VARIANTS
        for s in SEEDS
        if (v, s) not in lost
        and Path(f"outputs/eval/{v}/seed{s}/perplexity.json").is_file()
        and Path(f"outputs/geometry/{v}/seed{s}/summary.csv").is_file()
    ]
    if not finished:
        return
    label = config["data"]["label"]
    evals = [f"outputs/eval/{m['variant']}/seed{m['seed']}/perplexity.json" for m in finished]
    summaries = [f"outputs/geometry/{m['variant']}/seed{m['seed']}/summary.csv" for m in finished]
    write_perplexity_table(evals, "outputs/compare/perplexity.csv", diverged)
    plot_perplexity_table("outputs/compare/perplexity.csv", "outputs/compare/perplexity.png", label)
    plot_similarity_by_layer_files(summaries, finished, "outputs/compare/similarity_by_layer.png", label, diverged)
    write_differences(summaries, finished, config["comparisons"], "outputs/compare/difference.csv")
    plot_differences_table("outputs/compare/difference.csv", "outputs/compare/difference.png", label, diverged)
    print(f"tga: comparisons written without the diverged run(s): {sorted(lost)}")


# ---------------------------------------------------------------- pretrained models
# The `pretrained:` section (tga/pretrained.py, rules in pretrained.smk): checked before
# any job runs; entries join all_outputs() and the comparisons as one model each (seed 0).
from tga.pretrained import PretrainedError, check_pretrained, entry_revisions, evolution_revisions, final_revision, weights_mb

try:
    check_pretrained(config)
except PretrainedError as error:
    raise WorkflowError(f"Invalid config: {error}") from None

PRETRAINED = list(config["pretrained"])


def pretrained_entry(wildcards):
    """Only this entry's settings, so editing one entry never reruns another."""
    return dict(config["pretrained"][wildcards.entry])


def pretrained_final_stage(wildcards):
    """The entry's model as published (its latest revision) as the geometry's ``trained`` stage."""
    return {"trained": final_revision(config["pretrained"][wildcards.entry])}


def pretrained_evolution_stages(wildcards):
    """{step{N}: revision} of an entry's revisions, by training step."""
    return evolution_revisions(config["pretrained"][wildcards.entry])


def pretrained_first_stage(wildcards):
    """The earliest revision: the 'before' of the evolution figures."""
    return next(iter(evolution_revisions(config["pretrained"][wildcards.entry])))


def pretrained_title(wildcards):
    """Figure title naming the entry, its model and revision(s)."""
    entry = config["pretrained"][wildcards.entry]
    revisions = [r for r in entry_revisions(entry) if r]
    return f"{wildcards.entry} (pretrained): {entry['model']}" + (f" @ {', '.join(revisions)}" if revisions else "")


def pretrained_mem_mb(wildcards):
    """Host memory of a job: the weights on disk twice (loading, then the dtype copy) and
    1 GB for the activations and metrics; 8 GB before the weights are downloaded."""
    size = weights_mb(config["pretrained"][wildcards.entry])
    return 8000 if size is None else 2 * size + 1000


def pretrained_files(pattern):
    """``pattern`` (with ``{entry}``) for every pretrained entry, in config order."""
    return [pattern.format(entry=name) for name in PRETRAINED]


def pretrained_labels():
    """Labels of the comparisons for ``pretrained_files``: the entry name, seed 0."""
    return [{"variant": name, "seed": 0} for name in PRETRAINED]


def pretrained_outputs():
    """Every figure and table of every pretrained entry."""
    files = [
        *pretrained_files("outputs/figures/{entry}/pretrained/geometry_layers.png"),
        *pretrained_files("outputs/figures/{entry}/pretrained/similarity_heatmaps.png"),
        *pretrained_files("outputs/eval/{entry}/pretrained/perplexity.json"),
    ]
    for name in PRETRAINED:
        if config["pretrained"][name].get("revisions"):
            files += [f"outputs/evolution/{name}/pretrained/{figure}" for figure in PRETRAINED_EVOLUTION_FIGURES]
    return files


PRETRAINED_EVOLUTION_FIGURES = ["metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png"]
