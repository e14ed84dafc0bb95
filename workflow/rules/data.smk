# WikiText-2 (or user text) -> plain-text splits -> one token file per split; or, with
# data.source: hf, any `datasets` corpus -> token shards -> the same split files.
from tga.corpus import HF_ONLY_KEYS, describe_hf_training_text
from tga.fingerprint import code_fingerprint
from tga.seen_prompts import describe_training_text

HF_SOURCE = config["data"]["source"] == "hf"
# What the text sources' corpus depends on: the hf keys are left out, so their defaults
# never make an existing WikiText-2 corpus look changed.
TEXT_DATA = {k: v for k, v in config["data"].items() if k not in HF_ONLY_KEYS}


localrules:
    prepare_corpus,
    check_prompts,


if HF_SOURCE:

    rule tokenize_corpus:
        # One job reads the corpus once; its data.num_proc processes tokenize shards of
        # data.shard_documents documents (outputs/data/tokens/shards/, kept when the job is
        # killed, reused on the next run), then each split's files are their concatenation.
        input:
            tokenizer="outputs/data/tokens/tokenizer.json",
        output:
            tokens=expand("outputs/data/tokens/{split}.bin", split=SPLITS),
            meta=expand("outputs/data/tokens/{split}.json", split=SPLITS),
            # the documents' text, for the prompt check and the pretrained models
            texts=expand("outputs/data/corpus/{split}.txt", split=SPLITS),
            # which documents each split holds, tokens, bytes, dataset id/revision/fingerprint
            splits="outputs/data/corpus/splits.json",
        params:
            code=code_fingerprint("tga.hf_corpus", "tga.tokenizers"),
            # num_proc changes no byte of the outputs, so it is the job's threads only
            data={k: v for k, v in config["data"].items() if k not in ("num_proc", "label")},
        log:
            "outputs/logs/tokenize_corpus.log",
        benchmark:
            "outputs/benchmarks/tokenize_corpus.tsv"
        threads: config["data"]["num_proc"]
        resources:
            mem_mb=2000 + 1000 * config["data"]["num_proc"],
        conda:
            "../envs/tga.yaml"
        script:
            "../scripts/tokenize_corpus.py"

else:

    rule prepare_corpus:
        output:
            texts=expand("outputs/data/corpus/{split}.txt", split=SPLITS),
            # where each split came from (file, byte range, any validation holdout)
            splits="outputs/data/corpus/splits.json",
        params:
            code=code_fingerprint("tga.data"),
            data=TEXT_DATA,
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


rule build_tokenizer:
    input:
        # the char vocabulary's text; an hf corpus is tokenized with the tokenizer, so
        # there the tokenizer comes first (tga.settings refuses char with source hf)
        train=[] if HF_SOURCE else "outputs/data/corpus/train.txt",
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


rule check_prompts:
    # Which geometry prompts the model reads in training (tga/seen_prompts.py): a table to
    # read the geometry by, and a warning per prompt the training split holds verbatim.
    input:
        unpack(check_prompts_inputs),
    output:
        "outputs/data/prompts_in_training_text.csv",
    params:
        code=code_fingerprint("tga.seen_prompts", "tga.prompt_windows"),
        prompts=config["geometry"]["prompts"],
        where=(describe_hf_training_text if HF_SOURCE else describe_training_text)(
            config["data"], "outputs/data/corpus/train.txt"
        ),
        # text the config check could not read: a download, or an hf corpus
        downloaded=config["data"]["source"] in ("wikitext2", "hf"),
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
