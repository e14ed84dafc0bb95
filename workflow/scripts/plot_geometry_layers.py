"""Per-model figure: geometry metrics across layers, init vs trained."""
import pandas as pd

from tga.joblog import logged_job
from tga.figures_model import plot_geometry_layers

with logged_job(snakemake.log[0]):
    plot_geometry_layers(
        pd.read_csv(snakemake.input.summary), list(snakemake.output), snakemake.params.title, snakemake.params.data_label
    )
