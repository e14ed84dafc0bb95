# tga: Token Geometry Analyzer.
# download WikiText-2 -> tokenize -> train each variant and seed -> perplexity
# -> token geometry -> per-model figures -> comparison figures.
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/geometry.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/compare.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
