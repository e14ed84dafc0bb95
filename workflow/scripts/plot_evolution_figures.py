"""Evolution figures of one model in one job: metrics by step, heatmaps before/after, similarity change."""
import pandas as pd

from tga.figures_evolution import EVOLUTION_FIGURES, plot_evolution_figures
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_evolution_figures(
        pd.read_csv(snakemake.input.summary),
        snakemake.input.similarity,
        pd.read_csv(snakemake.input.metrics),
        {name: list(snakemake.output[name]) for name in EVOLUTION_FIGURES},
        snakemake.params.title,
        snakemake.params.data_label,
        train_log=pd.read_csv(snakemake.input.log),
    )
