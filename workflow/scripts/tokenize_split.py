"""Encode one split once into a compact token file that every job memory-maps; its
sidecar records where the split's text came from (the corpus's splits.json)."""
from tga.data import corpus_origin, tokenize_to_file
from tga.joblog import logged_job
from tga.tokenizers import load_tokenizer

with logged_job(snakemake.log[0]):
    tokenize_to_file(
        snakemake.input.text,
        load_tokenizer(snakemake.input.tokenizer),
        snakemake.output.tokens,
        origin=corpus_origin(snakemake.input.splits, snakemake.wildcards.split),
    )
