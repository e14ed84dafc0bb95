"""Comparison figure: test perplexity and bits per byte per variant."""
from tga.figures_compare import plot_perplexity_table
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_perplexity_table(snakemake.input[0], list(snakemake.output), snakemake.params.data_label)
