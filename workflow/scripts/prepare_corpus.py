"""Write the train/validation/test text splits (download or user files) and splits.json.
A downloaded training split is then checked for the geometry prompts, which the config
check could not read before this first run (a text source it has read already). The
prompts file comes from the config, not a param, so editing it never re-prepares the corpus."""
import sys
from pathlib import Path

from tga.data import prepare_corpus
from tga.joblog import logged_job
from tga.seen_prompts import training_text_warnings

with logged_job(snakemake.log[0]):
    data, corpus = snakemake.params.data, Path(snakemake.output.splits).parent
    prepare_corpus(data, corpus)
    if data["source"] == "wikitext2":
        for line in training_text_warnings(data, snakemake.config["geometry"]["prompts"], corpus):
            for stream in (sys.stderr, sys.__stderr__):  # the job's log, and the console
                print(f"tga: warning: {line}", file=stream, flush=True)
