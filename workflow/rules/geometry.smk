# Token geometry of each model at initialization and after training.
from tga.fingerprint import code_fingerprint


rule geometry:
    input:
        init="outputs/models/{variant}/seed{seed}/init.pt",
        final="outputs/models/{variant}/seed{seed}/final.pt",
        tokenizer="outputs/data/tokens/tokenizer.json",
        # the prompts file, or the test split's token file for test windows
        prompts=GEOMETRY_PROMPTS,
        # the training split's token counts, for the mean vector's logit-frequency correlation
        train_tokens="outputs/data/tokens/train.bin",
        train_meta="outputs/data/tokens/train.json",
    output:
        metrics="outputs/geometry/{variant}/seed{seed}/metrics.csv",
        summary="outputs/geometry/{variant}/seed{seed}/summary.csv",
        similarity="outputs/geometry/{variant}/seed{seed}/similarity.npz",
        prompts="outputs/geometry/{variant}/seed{seed}/prompts.csv",
    params:
        code=code_fingerprint("tga.geometry"),
        geometry=config["geometry"],
    log:
        "outputs/logs/geometry/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/geometry/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        gpu=analysis_gpus("geometry"),
        mem_mb=estimated_resources("geometry", "mem_mb"),
        runtime=estimated_resources("geometry", "runtime"),
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/geometry.py"
