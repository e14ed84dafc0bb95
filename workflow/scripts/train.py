"""Train one variant with one seed."""
from pathlib import Path

from tga.joblog import logged_job
from tga.train import train_from_settings

with logged_job(snakemake.log[0]):
    train_from_settings(
        snakemake.params.settings,
        seed=int(snakemake.wildcards.seed),
        threads=snakemake.threads,
        train_tokens=snakemake.input.train,
        val_tokens=snakemake.input.validation,
        out_dir=Path(snakemake.output.final).parent,
        run_name=f"{snakemake.wildcards.variant}/seed{snakemake.wildcards.seed}",
    )
