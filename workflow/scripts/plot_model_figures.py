"""Per-model figures in one job: geometry across layers, similarity heatmaps, training curves."""
import pandas as pd

from tga.figures_model import MODEL_FIGURES, plot_model_figures
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_model_figures(
        pd.read_csv(snakemake.input.summary),
        snakemake.input.similarity,
        pd.read_csv(snakemake.input.log),
        {name: list(snakemake.output[name]) for name in MODEL_FIGURES},
        snakemake.params.title,
        snakemake.params.data_label,
        training=snakemake.params.training,
    )
