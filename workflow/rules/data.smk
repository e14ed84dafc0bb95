# WikiText-2 (or user text) -> plain-text splits -> one token file per split.
from tga.fingerprint import code_fingerprint
from tga.seen_prompts import describe_training_text


localrules:
    prepare_corpus,
    check_prompts,


rule prepare_corpus:
    output:
        texts=expand("outputs/data/corpus/{split}.txt", split=SPLITS),
        # where each split came from (file, byte range, any validation holdout)
        splits="outputs/data/corpus/splits.json",
    params:
        code=code_fingerprint("tga.data"),
        data=config["data"],
    log:
        "outputs/logs/prepare_corpus.log",
    benchmark:
        "outputs/benchmarks/prepare_corpus.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/prepare_corpus.py"


rule build_tokenizer:
    input:
        train="outputs/data/corpus/train.txt",
    output:
        "outputs/data/tokens/tokenizer.json",
    params:
        code=code_fingerprint("tga.tokenizers"),
        tokenizer=config["tokenizer"],
    log:
        "outputs/logs/build_tokenizer.log",
    benchmark:
        "outputs/benchmarks/build_tokenizer.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/build_tokenizer.py"


rule tokenize_split:
    input:
        text="outputs/data/corpus/{split}.txt",
        splits="outputs/data/corpus/splits.json",
        tokenizer="outputs/data/tokens/tokenizer.json",
    output:
        tokens="outputs/data/tokens/{split}.bin",
        meta="outputs/data/tokens/{split}.json",
    params:
        code=code_fingerprint("tga.data", "tga.tokenizers"),
    log:
        "outputs/logs/tokenize_split/{split}.log",
    benchmark:
        "outputs/benchmarks/tokenize_split/{split}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/tokenize_split.py"


rule check_prompts:
    # Which geometry prompts the model reads in training (tga/seen_prompts.py): a table to
    # read the geometry by, and a warning per prompt the training split holds verbatim.
    input:
        unpack(check_prompts_inputs),
    output:
        "outputs/data/prompts_in_training_text.csv",
    params:
        code=code_fingerprint("tga.seen_prompts"),
        prompts=config["geometry"]["prompts"],
        where=describe_training_text(config["data"], "outputs/data/corpus/train.txt"),
        downloaded=config["data"]["source"] == "wikitext2",
    log:
        "outputs/logs/check_prompts.log",
    benchmark:
        "outputs/benchmarks/check_prompts.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/check_prompts.py"
