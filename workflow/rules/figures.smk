# Figures of one model: geometry across layers, similarity heatmaps, training curves.
# Every figure rule's outputs: the PNG, then its copies in figures.format (figure_copies).
from tga.figure_files import figure_copies
from tga.fingerprint import code_fingerprint


rule plot_geometry_layers:
    input:
        summary="outputs/geometry/{variant}/seed{seed}/summary.csv",
    output:
        report(
            "outputs/figures/{variant}/seed{seed}/geometry_layers.png",
            caption="../report/geometry_layers.rst",
            category="geometry",
            subcategory="{variant}",
            labels={"variant": "{variant}", "seed": "{seed}", "figure": "geometry by layer"},
        ),
        *figure_copies("outputs/figures/{variant}/seed{seed}/geometry_layers.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_model"),
        title=model_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/plot_geometry_layers/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/plot_geometry_layers/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_geometry_layers.py"


rule plot_similarity_heatmaps:
    input:
        similarity="outputs/geometry/{variant}/seed{seed}/similarity.npz",
    output:
        report(
            "outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png",
            caption="../report/similarity_heatmaps.rst",
            category="geometry",
            subcategory="{variant}",
            labels={"variant": "{variant}", "seed": "{seed}", "figure": "similarity heatmaps"},
        ),
        *figure_copies("outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_model"),
        title=model_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/plot_similarity_heatmaps/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/plot_similarity_heatmaps/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_similarity_heatmaps.py"


rule plot_training_curves:
    input:
        log="outputs/models/{variant}/seed{seed}/train_log.csv",
    output:
        report(
            "outputs/figures/{variant}/seed{seed}/training_curves.png",
            caption="../report/training_curves.rst",
            category="training",
            subcategory="{variant}",
            labels={"variant": "{variant}", "seed": "{seed}", "figure": "training curves"},
        ),
        *figure_copies("outputs/figures/{variant}/seed{seed}/training_curves.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_model"),
        title=model_title,
        data_label=config["data"]["label"],
        # the schedule is drawn from these settings (tga.train.learning_rate_at)
        training=lambda wildcards: variant_settings(wildcards)["training"],
    log:
        "outputs/logs/plot_training_curves/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/plot_training_curves/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_training_curves.py"
