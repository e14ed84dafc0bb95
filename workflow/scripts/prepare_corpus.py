"""Write the train/validation/test text splits (download or user files) and splits.json."""
from pathlib import Path

from tga.data import prepare_corpus
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    prepare_corpus(snakemake.params.data, Path(snakemake.output.splits).parent)
