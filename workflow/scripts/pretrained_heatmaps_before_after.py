"""Evolution figure of a pretrained entry: similarity at its first and last revision, and the change."""
from tga.figures_evolution import plot_heatmaps_before_after
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_heatmaps_before_after(
        snakemake.input.similarity, list(snakemake.output), snakemake.params.title, snakemake.params.data_label,
        before=snakemake.params.before,
    )
