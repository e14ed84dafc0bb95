# Across all variants and seeds: perplexity table and bars, similarity by layer,
# and A − B differences for every configured comparison.


rule perplexity_table:
    input:
        per_model("outputs/eval/{variant}/seed{seed}/perplexity.json"),
    output:
        "outputs/compare/perplexity.csv",
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
        "outputs/compare/perplexity.png",
    params:
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
    output:
        "outputs/compare/similarity_by_layer.png",
    params:
        labels=model_labels(),
        data_label=config["data"]["label"],
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


rule plot_differences:
    input:
        per_model("outputs/geometry/{variant}/seed{seed}/summary.csv"),
    output:
        figure="outputs/compare/difference.png",
        table="outputs/compare/difference.csv",
    params:
        labels=model_labels(),
        comparisons=config["comparisons"],
        data_label=config["data"]["label"],
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
