# Across all variants and seeds: perplexity table and bars, similarity by layer,
# and A − B differences for every configured comparison (the table, then its figure
# and the findings written from it).
from tga.fingerprint import code_fingerprint


rule perplexity_table:
    input:
        per_model("outputs/eval/{variant}/seed{seed}/perplexity.json"),
        pretrained_files("outputs/eval/{entry}/pretrained/perplexity.json"),
    output:
        report(
            "outputs/compare/perplexity.csv",
            caption="../report/perplexity_table.rst",
            category="evaluation",
            subcategory="perplexity",
            labels={"figure": "perplexity table"},
        ),
    params:
        code=code_fingerprint("tga.compare"),
        diverged=diverged_runs,
    log:
        "outputs/logs/compare/perplexity_table.log",
    benchmark:
        "outputs/benchmarks/compare/perplexity_table.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/perplexity_table.py"


rule plot_perplexity:
    input:
        "outputs/compare/perplexity.csv",
    output:
        report(
            "outputs/compare/perplexity.png",
            caption="../report/perplexity.rst",
            category="evaluation",
            subcategory="perplexity",
            labels={"figure": "perplexity by variant"},
        ),
        *figure_copies("outputs/compare/perplexity.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_compare"),
        data_label=config["data"]["label"],
    log:
        "outputs/logs/compare/plot_perplexity.log",
    benchmark:
        "outputs/benchmarks/compare/plot_perplexity.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_perplexity.py"


rule plot_similarity_by_layer:
    input:
        per_model("outputs/geometry/{variant}/seed{seed}/summary.csv"),
        pretrained_files("outputs/geometry/{entry}/pretrained/summary.csv"),
    output:
        report(
            "outputs/compare/similarity_by_layer.png",
            caption="../report/similarity_by_layer.rst",
            category="comparison",
            subcategory="all variants",
            labels={"figure": "similarity by layer"},
        ),
        *figure_copies("outputs/compare/similarity_by_layer.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_compare"),
        labels=lambda wildcards: trained_runs(wildcards) + pretrained_labels(),
        data_label=config["data"]["label"],
        diverged=diverged_runs,
    log:
        "outputs/logs/compare/plot_similarity_by_layer.log",
    benchmark:
        "outputs/benchmarks/compare/plot_similarity_by_layer.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_similarity_by_layer.py"


rule difference_table:
    input:
        per_model("outputs/geometry/{variant}/seed{seed}/summary.csv"),
        pretrained_files("outputs/geometry/{entry}/pretrained/summary.csv"),
    output:
        report(
            "outputs/compare/difference.csv",
            caption="../report/difference_table.rst",
            category="comparison",
            subcategory="differences A − B",
            labels={"figure": "differences table"},
        ),
    params:
        code=code_fingerprint("tga.compare"),
        labels=lambda wildcards: trained_runs(wildcards) + pretrained_labels(),
        comparisons=config["comparisons"],
        # variant -> where its norms sit and which norm: tga.compare.norm_effect labels
        # the values a norm sets from them (pretrained entries are not listed).
        architectures=lambda wildcards: {
            variant: {key: resolve_variant(config, variant)["model"][key] for key in ("norm_position", "norm")}
            for variant in VARIANTS
        },
    log:
        "outputs/logs/compare/difference_table.log",
    benchmark:
        "outputs/benchmarks/compare/difference_table.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/difference_table.py"


rule plot_differences:
    input:
        table=rules.difference_table.output[0],
        statuses=training_statuses,
    output:
        report(
            "outputs/compare/difference.png",
            caption="../report/difference.rst",
            category="comparison",
            subcategory="differences A − B",
            labels={"figure": "differences A − B"},
        ),
        *figure_copies("outputs/compare/difference.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_compare"),
        data_label=config["data"]["label"],
        diverged=diverged_runs,
    log:
        "outputs/logs/compare/plot_differences.log",
    benchmark:
        "outputs/benchmarks/compare/plot_differences.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_differences.py"


rule findings:
    input:
        table=rules.difference_table.output[0],
        # as plot_differences: through the train checkpoint, so a finished study with a
        # diverged variant plans nothing more
        statuses=training_statuses,
    output:
        report(
            "outputs/compare/findings.md",
            caption="../report/findings.rst",
            category="comparison",
            subcategory="differences A − B",
            labels={"figure": "findings"},
        ),
    params:
        code=code_fingerprint("tga.findings"),
    log:
        "outputs/logs/compare/findings.log",
    benchmark:
        "outputs/benchmarks/compare/findings.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/findings.py"
