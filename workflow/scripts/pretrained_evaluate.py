"""Test-split perplexity of one pretrained entry, with its own tokenizer."""
from tga.joblog import logged_job
from tga.pretrained import evaluate_pretrained

with logged_job(snakemake.log[0]):
    evaluate_pretrained(
        snakemake.params.entry,
        snakemake.wildcards.entry,
        snakemake.input.text,
        snakemake.output[0],
        batch_size=snakemake.params.evaluation["batch_size"],
        threads=snakemake.threads,
    )
