"""Token geometry of one model at initialization and at every checkpoint its training kept."""
from pathlib import Path

from tga.evolution import analyze_evolution
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    analyze_evolution(
        snakemake.params.stages,
        snakemake.input.prompts,
        snakemake.input.tokenizer,
        Path(snakemake.output.summary).parent,
        snakemake.params.geometry,
        threads=snakemake.threads,
        train_tokens=snakemake.input.train_tokens,
    )
