"""Evolution figure of a pretrained entry: mean pairwise cosine per layer, first vs last revision."""
import pandas as pd

from tga.figures_evolution import plot_similarity_change
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_similarity_change(
        pd.read_csv(snakemake.input.metrics), list(snakemake.output), snakemake.params.title, snakemake.params.data_label,
        before=snakemake.params.before,
    )
