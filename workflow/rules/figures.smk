# Figures of one model: geometry across layers, similarity heatmaps, training curves.
# One job draws all three (the start-up of Python, pandas and matplotlib is paid once per
# model, not once per figure); each figure is still a target of its own. Every figure's
# outputs: the PNG, then its copies in figures.format (figure_copies).
from tga.figure_files import figure_copies
from tga.fingerprint import code_fingerprint


rule model_figures:
    input:
        summary="outputs/geometry/{variant}/seed{seed}/summary.csv",
        similarity="outputs/geometry/{variant}/seed{seed}/similarity.npz",
        log="outputs/models/{variant}/seed{seed}/train_log.csv",
    output:
        geometry_layers=[
            report(
                "outputs/figures/{variant}/seed{seed}/geometry_layers.png",
                caption="../report/geometry_layers.rst",
                category="geometry",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "geometry by layer"},
            ),
            *figure_copies("outputs/figures/{variant}/seed{seed}/geometry_layers.png", config["figures"]["format"]),
        ],
        similarity_heatmaps=[
            report(
                "outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png",
                caption="../report/similarity_heatmaps.rst",
                category="geometry",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "similarity heatmaps"},
            ),
            *figure_copies("outputs/figures/{variant}/seed{seed}/similarity_heatmaps.png", config["figures"]["format"]),
        ],
        training_curves=[
            report(
                "outputs/figures/{variant}/seed{seed}/training_curves.png",
                caption="../report/training_curves.rst",
                category="training",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "training curves"},
            ),
            *figure_copies("outputs/figures/{variant}/seed{seed}/training_curves.png", config["figures"]["format"]),
        ],
    params:
        code=code_fingerprint("tga.figures_model"),
        title=model_title,
        data_label=config["data"]["label"],
        # the schedule is drawn from these settings (tga.train.learning_rate_at)
        training=lambda wildcards: variant_settings(wildcards)["training"],
    log:
        "outputs/logs/model_figures/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/model_figures/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_model_figures.py"
