"""Evolution figure: per-layer change of the mean pairwise cosine (after - before), paired by prompt."""
import pandas as pd

from tga.joblog import logged_job
from tga.figures_evolution import plot_similarity_change

with logged_job(snakemake.log[0]):
    plot_similarity_change(
        pd.read_csv(snakemake.input.metrics), list(snakemake.output), snakemake.params.title, snakemake.params.data_label
    )
