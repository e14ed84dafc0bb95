"""Findings page: every Benjamini-Hochberg-significant difference as one sentence, from the difference table."""
from tga.findings import write_findings
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    write_findings(snakemake.input.table, snakemake.output[0])
