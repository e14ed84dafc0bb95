"""Per-model figure: loss, perplexity and learning rate against the step."""
import pandas as pd

from tga.joblog import logged_job
from tga.figures_model import plot_training_curves

with logged_job(snakemake.log[0]):
    plot_training_curves(
        pd.read_csv(snakemake.input.log),
        list(snakemake.output),
        snakemake.params.title,
        snakemake.params.data_label,
        training=snakemake.params.training,
    )
