# Config validation and the helpers every rule file uses. Nothing imported here may
# import torch at module level: `snakemake -n` builds the DAG without it.
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tga.schema import SCHEMA_PATH
from tga.settings import ConfigError, check_config, coerce_config_types, resolve_variant, schema_error_message
from tga.evolution import evolution_stages
from tga.gpu_slots import JOBS_PER_GPU_ENV
from tga.figure_files import figure_copies
from tga.prompt_windows import is_test_windows
from tga.resources import estimate_variant_jobs, scheduler_resources, vocab_size_for


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
    # Prompts are checked against the training text: data.train, or the corpus a run prepared.
    check_config(config, this_machine=workflow.local_exec, corpus_dir="outputs/data/corpus",
                 warn=lambda line: print(f"tga: warning: {line}", file=sys.stderr))
except ConfigError as error:
    raise WorkflowError(f"Invalid config: {error}") from None
# Jobs on a node with several GPUs claim one each (tga/gpu_slots.py); this says how
# many may share a device. Jobs inherit the variable (locally and through the executors).
os.environ[JOBS_PER_GPU_ENV] = str(config["resources"]["jobs_per_gpu"])


# Where the geometry's prompts come from: the prompts file, or with test windows
# (geometry.prompts: {test_windows, length, seed}; tga/prompt_windows.py) the test split's tokens.
TEST_WINDOWS = is_test_windows(config["geometry"]["prompts"])
GEOMETRY_PROMPTS = "outputs/data/tokens/test.bin" if TEST_WINDOWS else config["geometry"]["prompts"]


def check_prompts_inputs(wildcards):
    """Rule check_prompts' inputs: the training text and the prompts; test windows are
    decoded with the tokenizer before they are looked for in the training text."""
    inputs = {"train": "outputs/data/corpus/train.txt", "prompts": GEOMETRY_PROMPTS}
    if TEST_WINDOWS:
        inputs["tokenizer"] = "outputs/data/tokens/tokenizer.json"
    return inputs


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


def analysis_gpus(section):
    """``resources: gpu=`` of an analysis job (evaluate, geometry, evolution): 1 when its
    ``<section>.device`` resolves to CUDA, so Snakemake queues it with the training jobs
    for the node's GPUs (each then claims its own, tga/gpu_slots.py) instead of it waiting
    on a claimed device; 0 on a CPU, and 0 when ``resources.train_gpus: 0`` lifts the
    limit for every job."""
    from tga.resources import job_device_type

    if int(config["resources"]["train_gpus"]) == 0:
        return 0
    return int(job_device_type(str(config[section]["device"]), 1, workflow.local_exec) == "cuda")


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


RUNS = [{"variant": v, "seed": s} for v in VARIANTS for s in SEEDS]


def training_outcome(run):
    """``(status path, record)`` of one run's training, read through the ``train``
    checkpoint. The record is None while the run is still to be trained: the path is
    then the checkpoint's target, which makes Snakemake train first and ask again."""
    from snakemake.exceptions import IncompleteCheckpointException

    from tga.status import read_status

    try:
        status = checkpoints.train.get(**run).output.status
    except IncompleteCheckpointException as pending:
        return pending.targetfile, None
    return status, read_status(status)


def per_model(pattern):
    """Input function: ``pattern`` for every run whose training ended ok. A run still
    to be trained counts as ok until its status says otherwise (so a dry run shows its
    jobs), and its status is listed too, so the list is made again once it exists."""

    def files(wildcards):
        found = []
        for run in RUNS:
            status, record = training_outcome(run)
            if record is None:
                found.append(status)
            if record is None or record["status"] == "ok":
                found.append(pattern.format(**run))
        return found

    return files


def training_statuses(wildcards):
    """Every run's status file, for rules whose params read the outcomes
    (``diverged_runs``) without taking per-model files: depending on them is what
    makes Snakemake ask again once training has ended."""
    return [training_outcome(run)[0] for run in RUNS]


def trained_runs(wildcards):
    """``{variant, seed}`` of the runs ``per_model`` lists, in its order."""
    return [run for run in RUNS if (training_outcome(run)[1] or {"status": "ok"})["status"] == "ok"]


def diverged_runs(wildcards):
    """``{variant, seed, step, message}`` of every run whose status says diverged."""
    diverged = []
    for run in RUNS:
        record = training_outcome(run)[1]
        if record is not None and record["status"] == "diverged":
            diverged.append({**run, "step": record["step"], "message": record["message"]})
    return diverged


EVOLUTION_FIGURES = ["metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png"]


def evolution_stage_paths(wildcards):
    """init + every checkpoint the variant's training settings keep, as {stage: path}."""
    training = resolve_variant(config, wildcards.variant)["training"]
    return evolution_stages(training, f"outputs/models/{wildcards.variant}/seed{wildcards.seed}")


def with_figure_copies(paths):
    """``paths`` with each figure's copies in ``figures.format`` after its PNG: requesting
    them is what makes Snakemake write them (a rule's unrequested outputs are not checked)."""
    fmt = config["figures"]["format"]
    return [out for path in paths for out in ([path, *figure_copies(path, fmt)] if path.endswith(".png") else [path])]


def evolution_outputs(wildcards):
    """Every evolution figure of every variant and seed whose training ended ok."""
    patterns = [f"outputs/evolution/{{variant}}/seed{{seed}}/{name}" for name in EVOLUTION_FIGURES]
    return with_figure_copies([path for pattern in patterns for path in per_model(pattern)(wildcards)])


def all_outputs(wildcards):
    return with_figure_copies([
        *per_model("outputs/figures/{variant}/seed{seed}/geometry_layers.png")(wildcards),
        *per_model("outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png")(wildcards),
        *per_model("outputs/figures/{variant}/seed{seed}/training_curves.png")(wildcards),
        "outputs/compare/perplexity.csv",
        "outputs/compare/perplexity.png",
        "outputs/compare/similarity_by_layer.png",
        "outputs/compare/difference.png",
        "outputs/compare/difference.csv",
        "outputs/data/prompts_in_training_text.csv",  # which prompts the models have read
        *evolution_outputs(wildcards),
        *pretrained_outputs(),
    ])


# ---------------------------------------------------------------- pretrained models
# The `pretrained:` section (tga/pretrained_entries.py, rules in pretrained.smk): checked before
# any job runs; entries join all_outputs() and the comparisons as one model each (seed 0).
from tga.pretrained_entries import PretrainedError, check_pretrained, entry_revisions, evolution_revisions, final_revision, weights_mb

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
