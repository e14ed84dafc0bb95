"""One table of every model's test perplexity."""
from tga.compare import write_perplexity_table
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    write_perplexity_table(list(snakemake.input), snakemake.output[0], snakemake.params.diverged)
