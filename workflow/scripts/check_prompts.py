"""Which geometry prompts the training split holds verbatim: a table, and one warning line
each. The console gets the warnings only for a download, whose text the config check could
not read before this run (it has warned about the user's own text already)."""
import sys

from tga.joblog import logged_job
from tga.prompt_windows import is_test_windows
from tga.seen_prompts import write_seen_prompts_table

with logged_job(snakemake.log[0]):
    # geometry.prompts as a mapping: test windows of the token file input.prompts, decoded by input.tokenizer
    windows = snakemake.params.prompts if is_test_windows(snakemake.params.prompts) else None
    for line in write_seen_prompts_table(snakemake.input.prompts, snakemake.input.train, snakemake.output[0],
                                         snakemake.params.where, test_windows=windows,
                                         tokenizer_path=snakemake.input.get("tokenizer")):
        streams = (sys.stderr, sys.__stderr__) if snakemake.params.downloaded else (sys.stderr,)
        for stream in streams:  # the job's log, and the console
            print(f"tga: warning: {line}", file=stream, flush=True)
