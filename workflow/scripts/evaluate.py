"""Test-split perplexity of one trained model."""
from tga.evaluate import evaluate_checkpoint
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    evaluate_checkpoint(
        snakemake.input.model,
        snakemake.input.tokens,
        snakemake.output[0],
        labels={"variant": snakemake.wildcards.variant, "seed": int(snakemake.wildcards.seed), "split": "test"},
        batch_size=snakemake.params.evaluation["batch_size"],
        device=snakemake.params.evaluation["device"],
        threads=snakemake.threads,
    )
