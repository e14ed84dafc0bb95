# Test-split perplexity of each trained model.
from tga.fingerprint import code_fingerprint


rule evaluate:
    input:
        model="outputs/models/{variant}/seed{seed}/final.pt",
        tokens="outputs/data/tokens/test.bin",
        meta="outputs/data/tokens/test.json",
    output:
        "outputs/eval/{variant}/seed{seed}/perplexity.json",
    params:
        code=code_fingerprint("tga.evaluate"),
        evaluation=config["evaluation"],
    log:
        "outputs/logs/evaluate/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/evaluate/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        gpu=analysis_gpus("evaluation"),
        mem_mb=estimated_resources("evaluate", "mem_mb"),
        runtime=estimated_resources("evaluate", "runtime"),
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/evaluate.py"
