"""Comparison figure: mean pairwise cosine similarity by layer, all variants."""
from tga.figures_compare import plot_similarity_by_layer_files
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_similarity_by_layer_files(
        list(snakemake.input), snakemake.params.labels, list(snakemake.output), snakemake.params.data_label,
        snakemake.params.diverged,
    )
