"""Evolution figure: training and validation loss on the step axis of the geometry figures."""
import pandas as pd

from tga.joblog import logged_job
from tga.figures_evolution import plot_loss_by_step

with logged_job(snakemake.log[0]):
    plot_loss_by_step(
        pd.read_csv(snakemake.input.log),
        snakemake.output[0],
        snakemake.params.title,
        snakemake.params.data_label,
        analysed_steps=snakemake.params.steps,
    )
