# One training job per variant and seed. A checkpoint: the run ends ok or diverged
# (status.json), and the rules that gather models ask it which ones to analyse.
from tga.fingerprint import code_fingerprint


def multi_node_resources():
    """SLURM resources of a training job spanning resources.train_nodes > 1 nodes: the
    nodes, one task per node (srun starts one torchrun on each), and `mpi`, which makes
    the SLURM plugin run this job's script in the allocation itself rather than in a
    one-task job step, so that the script's own srun reaches every node
    (tga.distributed.torchrun_command). Nothing for one node."""
    nodes = config["resources"].get("train_nodes", 1)
    if nodes <= 1:
        return {}
    return {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}


checkpoint train:
    input:
        train="outputs/data/tokens/train.bin",
        train_meta="outputs/data/tokens/train.json",
        validation="outputs/data/tokens/validation.bin",
        validation_meta="outputs/data/tokens/validation.json",
    output:
        # first: the target a pending run's input functions wait for (training_outcome)
        status="outputs/models/{variant}/seed{seed}/status.json",
        init="outputs/models/{variant}/seed{seed}/init.pt",
        # a diverged run's final.pt is the model as it stopped; no rule reads it
        final="outputs/models/{variant}/seed{seed}/final.pt",
        log="outputs/models/{variant}/seed{seed}/train_log.csv",
        checkpoints=directory("outputs/models/{variant}/seed{seed}/checkpoints"),
    params:
        code=code_fingerprint("tga.train", "tga.distributed", "tga.resume"),
        settings=variant_settings,
        # Inductor's and AOTAutograd's caches, shared: one job per graph compiles, the rest load
        compile_cache="outputs/cache/torch-compile",
    log:
        "outputs/logs/train/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/train/{variant}/seed{seed}.tsv"
    threads: config["resources"]["train_threads"]
    resources:
        # all the job's GPUs: train_gpus on each of train_nodes nodes (N > 1: DDP via torchrun)
        gpu=config["resources"]["train_gpus"] * config["resources"].get("train_nodes", 1),
        **multi_node_resources(),
        mem_mb=estimated_resources("train", "mem_mb"),
        runtime=estimated_resources("train", "runtime"),
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/train.py"
