"""Per-model figure: token x token cosine similarity at the chosen layers."""
from tga.joblog import logged_job
from tga.figures_model import plot_similarity_heatmaps

with logged_job(snakemake.log[0]):
    plot_similarity_heatmaps(snakemake.input.similarity, list(snakemake.output), snakemake.params.title, snakemake.params.data_label)
