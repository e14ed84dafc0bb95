"""Token geometry of one pretrained entry at the revisions of params.stages."""
from pathlib import Path

from tga.joblog import logged_job
from tga.pretrained import analyze_pretrained

with logged_job(snakemake.log[0]):
    analyze_pretrained(
        snakemake.params.entry,
        snakemake.wildcards.entry,
        snakemake.params.stages,
        snakemake.input.prompts,
        Path(snakemake.output.summary).parent,
        snakemake.params.geometry,
        train_text=snakemake.input.train_text,
        threads=snakemake.threads,
    )
