"""Token geometry of one model at initialization and after training."""
from pathlib import Path

from tga.geometry import analyze_run
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    analyze_run(
        {"init": snakemake.input.init, "trained": snakemake.input.final},
        snakemake.input.prompts,
        snakemake.input.tokenizer,
        Path(snakemake.output.summary).parent,
        snakemake.params.geometry,
        threads=snakemake.threads,
        train_tokens=snakemake.input.train_tokens,
    )
