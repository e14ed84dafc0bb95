"""Train one variant with one seed, resumably; a divergence is a result, not a failure.

With resources.train_gpus > 1 (or train_nodes > 1) tga.distributed.launch_training
starts torchrun and the job trains on all its GPUs with DDP; otherwise it trains here.
The resume state lives in ``outputs/.resume/...``, outside this job's declared
outputs, because Snakemake deletes those when the job fails or is killed. A diverged
run ends this job successfully with ``status.json`` saying where, and says so on the
console; the comparisons mark it, and Snakemake's own triggers (settings, code)
decide when it is trained again.
"""
import sys
from pathlib import Path

from tga.joblog import logged_job
from tga.resume import resume_dir_for
from tga.distributed import launch_training
from tga.train import TrainingDiverged

variant = snakemake.wildcards.variant
seed = int(snakemake.wildcards.seed)
out_dir = Path(snakemake.output.final).parent

diverged = None
with logged_job(snakemake.log[0]):
    try:
        nodes = int(getattr(snakemake.resources, "nodes", 1))
        launch_training(
            dict(
                settings=snakemake.params.settings,
                seed=seed,
                threads=snakemake.threads,
                train_tokens=snakemake.input.train,
                val_tokens=snakemake.input.validation,
                out_dir=out_dir,
                run_name=f"{variant}/seed{seed}",
                resume_dir=resume_dir_for(out_dir, variant, seed),
                compile_cache=snakemake.params.compile_cache,
            ),
            gpus_per_node=int(snakemake.resources.gpu) // nodes,
            nodes=nodes,
        )
    except TrainingDiverged as exc:
        print(f"tga train: {exc}", file=sys.stderr)
        diverged = exc
if diverged is not None:
    print(f"tga: warning: {diverged} (recorded in {snakemake.output.status}; the comparisons mark it)",
          file=sys.stderr, flush=True)
