"""Evolution figure: every geometry metric against the training step, one line per layer."""
import pandas as pd

from tga.joblog import logged_job
from tga.figures_evolution import plot_metrics_by_step

with logged_job(snakemake.log[0]):
    plot_metrics_by_step(
        pd.read_csv(snakemake.input.summary),
        list(snakemake.output),
        snakemake.params.title,
        snakemake.params.data_label,
        train_log=pd.read_csv(snakemake.input.log),
    )
