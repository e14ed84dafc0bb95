"""Comparison figure and table: A - B per layer for each configured pair."""
from tga.compare import write_differences
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    write_differences(
        list(snakemake.input),
        snakemake.params.labels,
        snakemake.params.comparisons,
        snakemake.output.figure,
        snakemake.output.table,
        snakemake.params.data_label,
        snakemake.params.diverged,
    )
