"""Evolution figure: token x token cosine similarity before and after training, and the change."""
from tga.joblog import logged_job
from tga.figures_evolution import plot_heatmaps_before_after

with logged_job(snakemake.log[0]):
    plot_heatmaps_before_after(
        snakemake.input.similarity, list(snakemake.output), snakemake.params.title, snakemake.params.data_label
    )
