"""Tokenize a `datasets` corpus (data.source: hf) once, in shards, with the job's threads
as processes: the split token files, their texts and splits.json (tga/hf_corpus.py)."""
from pathlib import Path

from tga.hf_corpus import prepare_hf_corpus
from tga.joblog import logged_job
from tga.tokenizers import load_tokenizer

with logged_job(snakemake.log[0]):
    prepare_hf_corpus(
        snakemake.params.data,
        load_tokenizer(snakemake.input.tokenizer),
        Path(snakemake.output.tokens[0]).parent,
        Path(snakemake.output.splits).parent,
        num_proc=snakemake.threads,
    )
