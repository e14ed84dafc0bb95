# A trained model as a Hugging Face transformers folder (tga.export; docs/export.md).
# Not part of `all`: ask for it by path, e.g.
#   snakemake outputs/export/llama-preln/seed0 --cores 1
# A variant that maps onto no transformers class (Post-LN, unigram_bias, ...) fails
# with one line saying why.
from tga.fingerprint import code_fingerprint


rule export:
    input:
        model="outputs/models/{variant}/seed{seed}/final.pt",
        tokenizer="outputs/data/tokens/tokenizer.json",
    output:
        directory("outputs/export/{variant}/seed{seed}"),
    params:
        code=code_fingerprint("tga.export"),
    log:
        "outputs/logs/export/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/export/{variant}/seed{seed}.tsv"
    threads: 1
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/export.py"
