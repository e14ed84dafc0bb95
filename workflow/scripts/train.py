"""Train one variant with one seed, resumably.

The resume state and any divergence record live in ``outputs/.resume/...`` and
``outputs/failed/...``, outside this job's declared outputs, because Snakemake
deletes those when the job fails or is killed.
"""
from pathlib import Path

from tga.joblog import logged_job
from tga.train import run_side_dirs, train_from_settings

variant = snakemake.wildcards.variant
seed = int(snakemake.wildcards.seed)
out_dir = Path(snakemake.output.final).parent
resume_dir, failure_dir = run_side_dirs(out_dir, variant, seed)

with logged_job(snakemake.log[0]):
    train_from_settings(
        snakemake.params.settings,
        seed=seed,
        threads=snakemake.threads,
        train_tokens=snakemake.input.train,
        val_tokens=snakemake.input.validation,
        out_dir=out_dir,
        run_name=f"{variant}/seed{seed}",
        resume_dir=resume_dir,
        failure_dir=failure_dir,
    )
