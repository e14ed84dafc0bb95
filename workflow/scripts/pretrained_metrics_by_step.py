"""Evolution figure of a pretrained entry: every metric against the step its revisions name."""
import pandas as pd

from tga.figures_evolution import plot_metrics_by_step
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    plot_metrics_by_step(
        pd.read_csv(snakemake.input.summary), list(snakemake.output), snakemake.params.title, snakemake.params.data_label
    )
