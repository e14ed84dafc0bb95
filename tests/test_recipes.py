"""The recipes in config/recipes/: they validate as the workflow validates them, and the
GPT-2-small recipe is what its comments say (GPT-2 small's shape, GPT-3 Small's
optimizer, Chinchilla's token budget, a global batch that splits over 1-8 GPUs, and a
memory estimate that fits an 80 GB GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tga.schema import SCHEMA_PATH, ModelConfig, TrainConfig
from tga.settings import merged_config, resolve_variant

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = ROOT / "config" / "recipes" / "gpt2-small.yaml"
GPT2_VOCAB = 50257


def recipe(path: Path = GPT2_SMALL) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_gpt2_small_recipe_validates_as_the_workflow_validates_it():
    """config/config.yaml, then the recipe, merged as Snakemake merges --configfile, against
    the schema (defaults filled in), and every variant's settings through the model's and
    training's own checks. Needs the schema keys of issue 23 (data source hf, training
    micro_batch_size, geometry prompts as a mapping and batch_size, resources
    jobs_per_gpu), which four branches add."""
    from snakemake.utils import validate

    config = merged_config([ROOT / "config" / "config.yaml", GPT2_SMALL])
    validate(config, str(SCHEMA_PATH))
    assert config["data"]["source"] == "hf" and config["resources"]["jobs_per_gpu"] == 1
    for variant in config["variants"]:
        settings = resolve_variant(config, variant)
        assert settings["training"]["micro_batch_size"] == 16, variant
        ModelConfig(vocab_size=GPT2_VOCAB, **settings["model"])
        TrainConfig(**settings["training"])


def test_gpt2_small_recipe_has_gpt2_smalls_shape_and_gpt3_smalls_optimizer():
    from tga.resources import _parameters

    config = recipe()
    model, training, data = config["model"], config["training"], config["data"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (12, 12, 768, 1024)
    assert config["tokenizer"]["name"] == "gpt2"
    assert set(config["variants"]) == {"llama-preln", "llama-postln", "standard-preln", "standard-postln"}
    for variant, overrides in config["variants"].items():
        params = _parameters(ModelConfig(vocab_size=GPT2_VOCAB, **{**model, **overrides}))
        assert 120e6 < params < 128e6, (variant, params)  # GPT-2 small's 124M, tied head
        # Chinchilla: about 20 training tokens per parameter
        assert 18 <= data["token_budget"] / params <= 22, (variant, data["token_budget"] / params)
    tokens_per_step = training["batch_size"] * model["block_size"]
    assert tokens_per_step == 2**19  # GPT-3 Small's 0.5M-token batch
    trained = training["max_steps"] * tokens_per_step
    assert 0.999 * data["token_budget"] <= trained <= data["token_budget"]  # the budget, once, no window twice
    assert abs(training["warmup_steps"] * tokens_per_step - 375e6) < 0.01 * 375e6  # GPT-3's warmup
    assert (training["learning_rate"], training["min_lr_ratio"], training["weight_decay"]) == (6e-4, 0.1, 0.1)
    assert (training["beta1"], training["beta2"], training["grad_clip"]) == (0.9, 0.95, 1.0)
    assert training["precision"] == "bf16" and training["compile"] is True
    for world in (1, 2, 4, 8):  # the global batch splits into whole accumulation steps on 1-8 GPUs
        assert training["batch_size"] % (training["micro_batch_size"] * world) == 0, world
    assert (data["dataset"], data["dataset_config"]) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")


@pytest.mark.parametrize("world_size", [1, 8])
def test_gpt2_small_recipe_fits_an_80_gb_gpu_per_the_estimate(world_size):
    """The recipe's memory per GPU (tga/resources.py, the head resolved for an 80 GB GPU
    as training resolves it) leaves room on an H100 80GB, on one GPU and on eight."""
    from tga.resources import GB, _corpus_tokens, estimate_training

    config = recipe()
    for variant, overrides in config["variants"].items():
        model = ModelConfig(vocab_size=GPT2_VOCAB, **{**config["model"], **overrides})
        estimate = estimate_training(model, config["training"], "cuda", _corpus_tokens(config),
                                     world_size=world_size, device_memory=80 * GB)
        assert estimate.accumulation == config["training"]["batch_size"] // (16 * world_size)
        assert estimate.device_bytes < 0.9 * 80 * GB, (variant, estimate.describe(gpu=True))
        if world_size == 1:  # the micro-batch, not the global batch, sets the activations
            whole = estimate_training(model, {**config["training"], "micro_batch_size": None}, "cuda",
                                      device_memory=80 * GB)
            assert whole.device_bytes > 80 * GB  # 512 windows in one forward would not fit


def test_the_recipe_table_prints_each_variants_jobs_from_the_estimates():
    """benchmarks/resource_estimates.py --recipe: the table docs/recipe.md shows."""
    import importlib.util

    from tga.resources import GB, _corpus_tokens, estimate_training

    spec = importlib.util.spec_from_file_location("resource_estimates", ROOT / "benchmarks" / "resource_estimates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.recipe_table([ROOT / "config" / "config.yaml", GPT2_SMALL], [1, 8], 80 * GB)
    config = recipe()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and " train | " in line]
    assert len(rows) == 4  # two architectures (Pre/Post-LN share their estimates) x 1 and 8 GPUs
    standard = ModelConfig(vocab_size=GPT2_VOCAB, **{**config["model"], **config["variants"]["standard-preln"]})
    for gpus in (1, 8):
        estimate = estimate_training(standard, config["training"], "cuda", _corpus_tokens(config), world_size=gpus,
                                     device_memory=80 * GB)
        (row,) = [r for r in rows if r[0] == "| standard-preln, standard-postln" and r[2] == str(gpus)]
        assert row[3] == f"{estimate.device_bytes / GB:.1f} GB" and row[6] == str(estimate.accumulation)
        assert row[8] == f"{estimate.tokens_per_second:,.0f}"
    assert "23.8% MFU" in table and "12 runs" in table
