"""One trained model as a Hugging Face transformers folder (config.json,
model.safetensors, tokenizer files, tga.json), checked to give tga's logits."""
from tga.export import export_checkpoint
from tga.joblog import logged_job

with logged_job(snakemake.log[0]):
    # overwrite: Snakemake removes a stale output folder itself; a leftover is replaced whole.
    export_checkpoint(snakemake.input.model, snakemake.output[0], snakemake.input.tokenizer, overwrite=True)
