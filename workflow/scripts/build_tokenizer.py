"""Build the tokenizer (the char vocabulary comes from the training split; an hf tokenizer is
loaded by path and revision and its files hashed, docs/tokenizers.md)."""
from tga.joblog import logged_job
from tga.tokenizers import build_tokenizer

with logged_job(snakemake.log[0]):
    build_tokenizer(snakemake.params.tokenizer, snakemake.input.train).save(snakemake.output[0])
