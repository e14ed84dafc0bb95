"""Comparison figure: A - B per layer for each configured pair, from the difference table."""
from tga.figures_compare import plot_differences_table
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_differences_table(
        snakemake.input.table, list(snakemake.output), snakemake.params.data_label, snakemake.params.diverged
    )
