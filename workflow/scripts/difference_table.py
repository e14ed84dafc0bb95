"""Comparison table: A - B per layer for each configured pair, with intervals and corrected tests."""
from tga.compare import write_differences
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    write_differences(
        list(snakemake.input),
        snakemake.params.labels,
        snakemake.params.comparisons,
        snakemake.output[0],
        snakemake.params.architectures,
    )
