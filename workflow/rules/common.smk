# Config validation and the helpers every rule file uses.
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tga.settings import ConfigError, check_config, resolve_variant, schema_error_message
from tga.evolution import evolution_stages, evolution_steps


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as error:
    schema = workflow.current_basedir.join("../schemas/config.schema.yaml").get_path_or_uri(secret_free=True)
    raise WorkflowError(schema_error_message(error, schema)) from None
try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(f"Invalid config: {error}") from None


VARIANTS = list(config["variants"])
SEEDS = config["seeds"]
SPLITS = ["train", "validation", "test"]


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS),
    seed=r"\d+",
    split="|".join(SPLITS),


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


def per_model(pattern):
    """``pattern`` expanded over every configured variant and seed."""
    return expand(pattern, variant=VARIANTS, seed=SEEDS)


def model_labels():
    """(variant, seed) pairs in the order of ``per_model``."""
    return [{"variant": v, "seed": s} for v in VARIANTS for s in SEEDS]


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
    return expand("outputs/evolution/{variant}/seed{seed}/{name}", variant=VARIANTS, seed=SEEDS, name=EVOLUTION_FIGURES)


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
    ]
