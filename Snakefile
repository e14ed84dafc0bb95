# tga: Token Geometry Analyzer.
# download WikiText-2 -> tokenize -> train each variant and seed -> perplexity
# -> token geometry -> per-model figures -> comparison figures, and the geometry at
# every checkpoint (model evolution). `snakemake --report report.html` gathers them.
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/geometry.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/evolution.smk"
include: "workflow/rules/pretrained.smk"
include: "workflow/rules/export.smk"


rule all:
    input:
        all_outputs,
        rules.findings.output[0],
    default_target: True
